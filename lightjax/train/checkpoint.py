"""Orbax checkpoints of a run: train state + data-iterator position + metadata, saved together.

WORKDIR/checkpoints/<step>/ holds one composite checkpoint:
  state      the TrainState (params, optimizer state, step, rng), each array saved in its shards
  meta       step, the data position (the global batches consumed), tokens_seen, elapsed_s, the
             lightjax version and the run's resolved config

Saves are asynchronous (the loop goes on while arrays are written) and atomic: Orbax writes into a
temporary directory and renames it when complete, so a run killed mid-save leaves the previous
checkpoints intact and the partial one is ignored and cleaned up. The last `keep` checkpoints are
kept, plus the `keep_best` with the lowest validation loss (Orbax's own retention policies).

Restoring builds its target from the current run's abstract state and shardings, so a checkpoint
written on any mesh restores onto any other; the data position is one number, the same for any
number of processes (see data/pipeline.py), so it also restores onto any other process count.
WORKDIR may be any path `etils.epath` knows (local, gs://...).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

import lightjax
from lightjax.model import lora
from lightjax.model.config import ModelConfig
from lightjax.runtime.distributed import is_leader, print_once
from lightjax.runtime.files import absolute
from lightjax.train.config import default_config, resolve_model_config

log = logging.getLogger(__name__)

# Keys whose change would make a resumed run a different experiment. Anything else (logging, eval and
# checkpoint cadence, max_steps, data paths, workers) may change between a run and its resumption.
FROZEN_KEYS = ("model.", "data.source", "data.tokenizer", "data.seq_len", "data.text_field", "data.val_split",
               "data.val_fraction", "data.document_mask", "data.mixture", "data.hf_streaming",
               "train.seed", "train.global_batch_size", "train.param_dtype",
               "train.z_loss", "optim.", "lora.")


class CheckpointError(RuntimeError):
    pass


def _digest(x: jax.Array) -> jax.Array:
    """A uint32 checksum of an array's bytes: the sum of each element's bits times an odd number that
    depends on its position, modulo 2**32. Any one flipped bit changes it; it is exact integer
    arithmetic, so it is the same whatever the mesh the array is sharded over."""
    bits = jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize]).astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride % 2**32)
        stride *= x.shape[d]
    return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)


_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


@jax.jit
def _digests(state: Any) -> Any:
    return jax.tree.map(_digest, state)


def state_digests(state: Any) -> dict[str, int]:
    """{path of each array in the state: its checksum}, saved with a checkpoint and checked on restore:
    damaged array data that still reads (flipped bits) is caught before it trains."""
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(_digests(state)))[0]
    return {_path_name(path): int(value) for path, value in leaves}


def _path_name(path: tuple) -> str:
    """'params/wte/embedding': the same for a TrainState and for the nested dict Orbax restores it as."""
    return "/".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: saved -> current' for every frozen key that differs. A key the saved config lacks (added
    to lightjax since) counts as its default."""
    defaults = json.loads(default_config().to_json_best_effort())  # as saved: tuples as lists
    a, b = {**_flatten(defaults), **_flatten(saved)}, _flatten(current)
    keys = sorted(k for k in set(a) | set(b) if k.startswith(FROZEN_KEYS) and a.get(k) != b.get(k))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys]


def check_digests(meta: dict[str, Any], state: Any) -> None:
    """CheckpointError unless every array of a restored state matches the digest saved with it
    (checkpoints from before digests were saved are taken as they read)."""
    saved = meta.get("digests")
    if not saved:
        return
    got = state_digests(state)
    damaged = [path for path, digest in saved.items() if got.get(path) != digest]
    if damaged:
        raise CheckpointError(f"the data of {len(damaged)} array(s) ({', '.join(damaged[:3])}) differs from what "
                              "was saved")


def _val_loss(metrics: dict[str, Any]) -> float:
    return metrics.get("val_loss", math.inf)


class Checkpointer:
    def __init__(self, workdir: str | epath.PathLike, keep: int = 3, async_save: bool = True, keep_best: int = 1):
        self.directory = absolute(workdir) / "checkpoints"
        # The lowest validation losses (BestN) beside the latest: a save without an evaluation ranks as
        # +inf, so it is kept only while it is among the latest.
        preservation = policies.AnyPreservationPolicy([
            policies.LatestN(n=keep),
            policies.BestN(get_metric_fn=_val_loss, reverse=True, n=keep_best, keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save, preservation_policy=preservation,
            # best_fn is what makes Orbax write each save's metrics to disk, where a resumed run's BestN
            # reads them back (without it they lived only in the saving process's memory).
            best_fn=_val_loss, best_mode="min",
            cleanup_tmp_directories=True,  # partial saves of a killed run
        )
        self._unconfirmed = False  # a save was started and has not been seen to succeed or fail
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        )

    def save(self, step: int, state: Any, meta: dict[str, Any], val_loss: float | None = None) -> None:
        meta = {**meta, "step": step, "lightjax_version": lightjax.__version__, "digests": state_digests(state)}
        self._guard(lambda: self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics={} if val_loss is None else {"val_loss": float(val_loss)},
            force=True,
        ))
        self._unconfirmed = True

    def steps(self) -> list[int]:
        """Complete checkpoints, oldest first (Orbax lists only finished ones)."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def best_step(self) -> int | None:
        """The complete checkpoint saved with the lowest validation loss (None: none was saved with one)."""
        scored = [(metrics["val_loss"], step) for step in self.steps()
                  if "val_loss" in (metrics := self.manager.metrics(step) or {})]
        return min(scored)[1] if scored else None

    def choose(self, which: int | str | None) -> int:
        """The step of a complete checkpoint: `which` is a step, 'latest' (or None) or 'best' (the lowest
        validation loss). CheckpointError, naming what there is, when there is no such checkpoint."""
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"No complete checkpoint under {self.directory}.")
        if which is None or which == "latest":
            return steps[-1]
        if which == "best":
            best = self.best_step()
            if best is None:
                raise CheckpointError(f"No checkpoint under {self.directory} was saved with a validation loss "
                                      f"(there are {steps}): the run evaluated none (train.eval_every=0?). Use "
                                      "--step latest or a step number.")
            return best
        if not str(which).isdigit():
            raise ValueError(f"step={which!r} is not 'latest', 'best' or a step number.")
        if int(which) not in steps:
            raise CheckpointError(f"No checkpoint for step {which} under {self.directory}; there are {steps}.")
        return int(which)

    def read_meta(self, step: int) -> dict[str, Any]:
        return json.loads((self.directory / str(step) / "meta" / "metadata").read_text())

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """(state, meta) of checkpoint `step`, the state placed per `abstract_state`'s shardings and
        checked against the digests saved with it (CheckpointError if any array differs)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        meta = dict(restored["meta"])
        meta.setdefault("data_position", meta["step"])  # checkpoints from before the position was saved
        check_digests(meta, restored["state"])
        return restored["state"], meta

    def restore_latest(self, abstract_state: Any,
                       check_meta: Callable[[dict[str, Any]], None] | None = None) -> tuple[Any, dict[str, Any]] | None:
        """The newest checkpoint that restores intact. One whose metadata or array data is missing,
        unreadable or damaged is moved aside (said in one line) and the previous one tried.
        `check_meta(meta)` may refuse a readable checkpoint (of another run's settings) by raising:
        that is no damage, and nothing is moved. None when no checkpoint is left."""
        for step in reversed(self.steps()):
            try:
                meta = self.read_meta(step)
            except Exception as e:  # noqa: BLE001 (any failure to read means: fall back)
                self._set_aside(step, e)
                continue
            if check_meta is not None:
                check_meta(meta)
            try:
                return self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001
                self._set_aside(step, e)
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        """Move checkpoint `step` to checkpoints_unreadable/: not deleted, since the run must be able to
        save this step again, and the bytes stay for whoever wants to look at them."""
        path = self.directory / str(step)
        aside = self.directory.parent / "checkpoints_unreadable" / f"{step}-{int(time.time())}"
        reason = str(error).splitlines()[0][:200] if str(error) else ""
        log.warning("Checkpoint %s is unreadable (%s: %s).", path, type(error).__name__, reason)
        print_once(f"Checkpoint {path} is unreadable or damaged ({type(error).__name__}: {reason}); moved to "
                   f"{aside}, falling back to the previous one.")
        if is_leader():
            aside.parent.mkdir(parents=True, exist_ok=True)
            path.rename(aside)
        self.manager.reload()

    def preempted(self, step: int) -> bool:
        """True once JAX's preemption service (multi-host TPU) says every host must save now."""
        return jax.process_count() > 1 and self.manager.reached_preemption(step)

    def check(self) -> None:
        """Raise (CheckpointError) if a save running in the background has failed: called every step,
        so that a full disk or a lost permission stops the run at once, not at the next save. Free once
        the last save is known to have succeeded."""
        if not self._unconfirmed:
            return
        self._guard(self.manager.check_for_errors)
        if not self.manager.is_saving_in_progress():
            self._unconfirmed = False
            self.wait()  # returns at once after a save that succeeded, raises its error after one that failed

    def wait(self) -> None:
        self._guard(self.manager.wait_until_finished)

    def _guard(self, fn: Callable[[], Any]) -> Any:
        """fn(), with a failed save turned into one CheckpointError naming the folder and the cause, and
        its partial checkpoint removed (the complete ones are untouched)."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 (whatever the storage raised, reported in one line)
            if is_leader():
                for partial in self.directory.glob("*.orbax-checkpoint-tmp*"):
                    partial.rmtree()
            raise CheckpointError(f"Saving a checkpoint under {self.directory} failed: {_cause(e)}. The complete "
                                  "checkpoints there are intact.") from None

    def close(self) -> None:
        self.manager.close()


def _cause(error: BaseException) -> str:
    """The root of a storage error in a few words: 'No space left on device (errno 28)'."""
    while error.__cause__ is not None or (error.__context__ is not None and not str(error)):
        error = error.__cause__ or error.__context__
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror} (errno {error.errno}){f': {error.filename}' if error.filename else ''}"
    text = str(error)
    found = re.search(r"\[os_error_code='?(\d+)'?\]", text)  # TensorStore's form
    if found:
        return f"{os.strerror(int(found.group(1)))} (errno {found.group(1)})"
    return (text.splitlines() or [""])[0][:200]


def restore_params(workdir: str | epath.PathLike, step: int | str | None = None) -> tuple[Any, Any, int]:
    """(the run's config as a ConfigDict, its parameters on the default device, the step) from a
    run's checkpoint: `step`, 'latest' (the default) or 'best' (the lowest validation loss); the
    optimizer state is not kept. The latest one that does not read (a crash mid-write, damage) falls back
    to the one before, said in a line, as a resumed run does; nothing in the run is changed."""
    workdir = absolute(workdir)
    if not (workdir / "checkpoints").is_dir():
        where = "does not exist" if not workdir.exists() else "has no checkpoints/ folder: not a training run's workdir"
        raise CheckpointError(f"{workdir} {where}.")
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        chosen = ckpt.choose(step)
        latest = step is None or step == "latest"
        candidates = [s for s in reversed(ckpt.steps()) if s <= chosen] if latest else [chosen]
        for i, candidate in enumerate(candidates):
            try:
                meta, state = _read_params(ckpt, candidate)
                return ml_collections.ConfigDict(meta["config"]), state["params"], candidate
            except Exception as e:  # noqa: BLE001 (any failure to read: the previous one, or the error)
                reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
                if i + 1 == len(candidates):
                    raise CheckpointError(f"Checkpoint {ckpt.directory / str(candidate)} cannot be read ({reason})"
                                          f"{'; no earlier one could be either' if i else ''}.") from None
                print_once(f"Checkpoint {ckpt.directory / str(candidate)} cannot be read ({reason}); using the "
                           "one before it.")
    finally:
        ckpt.close()
    raise AssertionError("unreachable")


def _read_params(ckpt: Checkpointer, step: int) -> tuple[dict[str, Any], Any]:
    """(meta, state without the optimizer) of checkpoint `step`, on this process's first device whatever
    mesh wrote it, checked against its digests."""
    meta = ckpt.read_meta(step)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          ckpt.manager.item_metadata(step)["state"])
    state = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    check_digests(meta, state)
    return meta, state


# Fields that may differ between pretrained weights and the run that starts from them.
_FREE_WHEN_LOADING = ("name", "block_size", "dropout", "vocab_size", "padding_multiple", "lora_r", "lora_alpha",
                      "lora_dropout", "lora_targets")  # LoRA adapters start fresh beside the loaded weights


def check_same_architecture(run_cfg: Any, weights_cfg: Any, source: str) -> None:
    """A CheckpointError naming every architecture field in which the weights differ from the run."""
    run, weights = run_cfg.to_dict(), weights_cfg.to_dict()
    diffs = [f"{k}: config {run[k]!r} vs weights {weights[k]!r}" for k in run
             if k not in _FREE_WHEN_LOADING and run[k] != weights[k]]
    if diffs:
        raise CheckpointError(f"config.train.init_from={source!r} holds another architecture than config.model: "
                              + "; ".join(diffs) + ".")


def restore_model(workdir: str | epath.PathLike, step: int | str | None = None) -> tuple[ModelConfig, Any, int, Any]:
    """(ModelConfig, parameters, step, the run's config) of a run's checkpoint, LoRA adapters merged
    into their kernels (lora.merge): the plain model that the fine-tuned run computes."""
    config, params, step = restore_params(workdir, step)
    cfg, params = lora.merge(resolve_model_config(config), params)
    return cfg, params, step, config
