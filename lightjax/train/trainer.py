"""The training loop: data -> train step -> metrics, evaluation, checkpoints, preemption.

`train(config, workdir)` is what `scripts/train.py` runs. Before the first step it prepares the
tokenizer and the token files, builds the run once (run.py: mesh, model, state shardings, steps) and
restores or initialises the state. One iteration of `_Loop.train`: the next batch from the
Grain iterator is placed on the mesh, the jitted step updates the state, and the previous step's
metrics are read back (one step late, so the host never waits for the device it just fed). Every
`eval_every` steps the validation split is evaluated; every `save_every` steps, at the end and on
SIGTERM/SIGINT the state, the data position and the metadata are saved together.

In a multi-process job every process runs this same loop on its slice of each global batch; process
0 alone writes the run's files and prints (see runtime/distributed.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from tqdm import tqdm

from lightjax.convert.export import load_weights
from lightjax.convert.hf_folder import keep_base_files
from lightjax.convert.peft import is_peft_dir, read_adapters
from lightjax.data.mixture import parse_mixture
from lightjax.data.pipeline import train_iterator
from lightjax.data.prepare import prepare_mixture, prepare_splits, prepare_tokenizer, tokens_directory
from lightjax.data.rows import Rows
from lightjax.data.tokenizers import check_vocab
from lightjax.model.flops import causal_keys, flops_per_token
from lightjax.runtime.distributed import any_process, is_leader, print_once, run_once
from lightjax.runtime.files import WorkdirLock, absolute, write_atomic
from lightjax.runtime.hardware import mfu, peak_flops_per_device
from lightjax.runtime.sharding import PlacedBatches
from lightjax.train.checkpoint import Checkpointer, CheckpointError, check_same_architecture, config_changes
from lightjax.train.evaluate import evaluate, evaluate_preference, evaluate_sources
from lightjax.train.metrics import MetricWriters, plot_losses, write_metrics_csv
from lightjax.train.run import Run, build_run


class _StopSignal:
    """First SIGTERM/SIGINT: finish the step, save, exit cleanly. Second SIGINT: abort at once.

    With several processes SIGTERM is left to JAX's preemption service, which makes every process
    stop at the same step (Checkpointer.preempted)."""

    def __init__(self) -> None:
        self.received: str | None = None
        signals = (signal.SIGTERM, signal.SIGINT) if jax.process_count() == 1 else (signal.SIGINT,)
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class _HeldInterrupt:
    """A Ctrl-C during start-up, held until start-up is over and raised then (KeyboardInterrupt): raised
    inside an XLA compilation, it ended the process while XLA's threads still ran, which crashed it.
    A second Ctrl-C raises at once."""

    def __init__(self) -> None:
        self.received = False
        self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received:
            raise KeyboardInterrupt
        self.received = True

    def restore(self) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def release(self) -> None:
        self.restore()
        if self.received:
            raise KeyboardInterrupt


def _resume(config: Any, checkpointer: Checkpointer, run: Run,
            config_dict: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(state, meta): restored per config.checkpoint.resume, or freshly initialised (from
    config.train.init_from's weights when given)."""
    mode = config.checkpoint.resume

    def same_run(meta: dict[str, Any]) -> None:
        changes = config_changes(meta.get("config", {}), config_dict)
        if changes:
            raise CheckpointError("Cannot resume: these settings differ from the checkpoint's run: "
                                  + "; ".join(changes) + ". Use a new --workdir or --config.checkpoint.resume=never.")

    if mode == "never" or (mode == "auto" and not checkpointer.steps()):
        return _fresh_state(config, run, checkpointer.directory.parent), {}
    if mode == "auto":
        restored = checkpointer.restore_latest(run.abstract_state, same_run)
        if restored is None:
            raise CheckpointError(f"No checkpoint under {checkpointer.directory} could be read.")
        where = checkpointer.directory / str(restored[1]["step"])
    else:
        restored, where = _restore_from(mode, run, same_run)
    print_once(f"Resumed from {where} (step {restored[1]['step']}) on {jax.process_count()} process(es).")
    return restored


def _check_resume_target(mode: str, workdir: epath.Path) -> None:
    """A run that does not resume from its own workdir (resume='never', or another run's checkpoint) must
    not start in a workdir that holds a run: it would rewrite that run's metrics and config at once and
    fail at its first save. Refused before anything is written there."""
    if mode == "auto" or (mode != "never" and str(absolute(mode)).startswith(str(workdir) + "/")):
        return
    steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()] \
        if (workdir / "checkpoints").is_dir() else []
    metrics = workdir / "metrics.jsonl"
    if not steps and not (metrics.exists() and metrics.read_text().strip()):
        return
    held = f"its last checkpoint is step {max(steps)}" if steps else "its metrics.jsonl has rows"
    raise CheckpointError(f"config.checkpoint.resume={mode!r}, but {workdir} already holds a run ({held}), which "
                          "this run would overwrite. Use another --workdir, or --config.checkpoint.resume=auto to "
                          "continue that run.")


def _restore_from(mode: str, run: Run, same_run: Any) -> tuple[tuple[Any, dict[str, Any]], epath.Path]:
    """checkpoint.resume=PATH: another run's latest checkpoint (PATH its workdir) or one of them
    (PATH = RUN/checkpoints/STEP). Nothing in that run is changed; a damaged checkpoint is an error."""
    path = epath.Path(mode)
    step = int(path.name) if path.parent.name == "checkpoints" and path.name.isdigit() else None
    run_dir = path.parent.parent if step is not None else path
    if not (run_dir / "checkpoints").is_dir():
        raise CheckpointError(f"config.checkpoint.resume={mode!r}: no checkpoints/ under {run_dir}.")
    source = Checkpointer(run_dir, async_save=False)
    try:
        steps = source.steps()
        step = steps[-1] if step is None and steps else step
        if step not in steps:
            raise CheckpointError(f"config.checkpoint.resume={mode!r}: no complete checkpoint "
                                  f"{'there' if step is None else step} (there are {steps or 'none'}).")
        same_run(source.read_meta(step))
        return source.restore(step, run.abstract_state), source.directory / str(step)
    finally:
        source.close()


def _fresh_state(config: Any, run: Run, workdir: epath.Path) -> Any:
    source = config.train.init_from
    if not source:
        if config.lora.rank:
            print_once(f"WARNING: config.lora.rank={config.lora.rank} without config.train.init_from: the adapters "
                       "train over a frozen model of random weights. Set train.init_from to the pretrained weights "
                       "(an export or Hugging Face directory), or lora.rank=0 to train every weight.")
        return run.init_state()
    state, adapters = _initial_state(config, run)
    run_once("keeping the base model's files", lambda: keep_base_files(source, workdir))
    print_once(f"Starting from the weights in {source}{' and its LoRA adapters' if adapters else ''}.")
    return state


def _initial_state(config: Any, run: Run) -> tuple[Any, bool]:
    """(the state a fresh run starts from: config.train.init_from's weights, or the seeded initialisation;
    whether init_from brought LoRA adapters). Nothing is written or said."""
    source = config.train.init_from
    if not source:
        return run.init_state(), False
    weights_cfg, params = load_weights(source)
    check_same_architecture(run.model.config, weights_cfg, source)
    adapters = read_adapters(source, run.model.config) if is_peft_dir(source) else None
    return run.init_state(params, adapters), adapters is not None


class _Progress:
    """A progress bar (loss, tokens/s, MFU, ETA) on a terminal; plain log lines otherwise."""

    def __init__(self, enabled: bool, start_step: int, max_steps: int):
        self.bar = None
        if enabled and sys.stdout.isatty() and jax.process_index() == 0:
            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def step(self, row: dict[str, Any] | None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if row is not None:
                self.bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_sec']:,.0f}",
                                     mfu=f"{100 * row['mfu']:.1f}%")
        elif row is not None and jax.process_index() == 0:
            print(f"step {row['step']:6d} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | grad_norm "
                  f"{row['grad_norm']:.3f} | {row['tokens_per_sec']:,.0f} tok/s | MFU {100 * row['mfu']:.1f}% "
                  f"(full square {100 * row['mfu_full_square']:.1f}%)",
                  flush=True)

    def message(self, text: str) -> None:
        if jax.process_index() != 0:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _prepare(config: Any, workdir: epath.Path, closing: contextlib.ExitStack) -> tuple[Run, Rows, Callable]:
    """What the loop needs before the first step: the built steps, the training rows (of one source, or a
    mixture's stream), and what makes a run's evaluation of its params over the validation split(s)."""
    run = build_run(config)
    print_once(f"Attention kernel: {run.model.attention} ({run.attention_why}).")
    tokenizer = prepare_tokenizer(config, workdir)
    check_vocab(tokenizer, run.model.config.vocab_size)
    mixture = parse_mixture(config.data)
    if mixture is None:
        splits = prepare_splits(config, tokens_directory(config, workdir), workdir / "tokenizer")
        train_rows, val_rows = splits.rows("train", training=True), splits.rows("validation", training=False)
        closing.callback(val_rows.close)
        if run.preference:
            evaluation = lambda r: functools.partial(evaluate_preference, r, rows=val_rows, config=config)  # noqa: E731
        else:
            tokens_per_char = splits.tokens_per_char("validation")
            evaluation = lambda r: functools.partial(evaluate, r, rows=val_rows, config=config,  # noqa: E731
                                                     tokens_per_char=tokens_per_char)
    else:
        mixed = prepare_mixture(config, workdir, workdir / "tokenizer", mixture)
        train_rows, val_rows = mixed.train_rows(config.train.seed, config.train.global_batch_size), mixed.val_rows()
        for rows in val_rows.values():
            closing.callback(rows.close)
        evaluation = lambda r: functools.partial(evaluate_sources, r, rows=val_rows, config=config,  # noqa: E731
                                                 tokens_per_char=mixed.tokens_per_char(),
                                                 weights=mixture.weights_at(0))
    if config.train.get("eval_tasks"):  # the harness (the `eval` extra) is imported only when asked for
        from lightjax.train.tasks import with_tasks

        plain = evaluation
        evaluation = lambda r: with_tasks(plain(r), r, tokenizer, config)  # noqa: E731
    closing.callback(train_rows.close)
    if train_rows.note:
        print_once(f"Training data: {train_rows.note}")
    return run, train_rows, evaluation


def train(config: Any, workdir: str | epath.PathLike) -> dict[str, Any]:
    """Run (or resume) training as configured, holding the workdir's lock (process 0 holds it for the
    job; a second trainer on the same workdir is refused); returns a summary of the run."""
    workdir = absolute(workdir)
    _check_resume_target(config.checkpoint.resume, workdir)

    def lock() -> WorkdirLock:
        workdir.mkdir(parents=True, exist_ok=True)
        return WorkdirLock(workdir).acquire()

    held = run_once("locking the workdir", lock)
    try:
        with contextlib.ExitStack() as closing:  # every file, thread and worker closed on every way out
            summary = _train(config, workdir, closing)
        if is_leader():
            plot_losses(workdir)
            write_metrics_csv(workdir)
        return summary
    finally:
        if held is not None:
            held.release()


def _train(config: Any, workdir: epath.Path, closing: contextlib.ExitStack) -> dict[str, Any]:
    held = _HeldInterrupt()
    closing.callback(held.restore)
    run, rows, evaluation = _prepare(config, workdir, closing)
    config_dict = json.loads(config.to_json_best_effort())
    ck = config.checkpoint
    checkpointer = Checkpointer(workdir, ck.keep, ck.async_save, ck.keep_best)
    closing.callback(checkpointer.close)
    closing.callback(checkpointer.wait)  # first: a save in flight finishes before the manager closes
    state, meta = _resume(config, checkpointer, run, config_dict)
    if run.needs_reference:  # full preference tuning: the initial weights, frozen (a copy: the state is donated)
        initial = jax.tree.map(jnp.copy, state.params) if not meta else _initial_state(config, run)[0].params
        run = run.with_reference(initial)
    evaluate_params = evaluation(run)
    if is_leader():
        write_atomic(workdir / "config.json", json.dumps(config_dict, indent=1))
    t, start = config.train, _Start.of(meta)
    source = train_iterator(rows, t.global_batch_size, t.seed, config.data.num_workers,
                            start_step=start.data_position)
    if hasattr(source, "close"):
        closing.callback(source.close)
    batches = PlacedBatches(source, run.mesh)
    closing.callback(batches.close)  # before the source closes
    writers = closing.enter_context(contextlib.closing(
        MetricWriters(workdir, start.step, config.logging.tensorboard, config.logging.wandb_project, config_dict)))
    progress = closing.enter_context(contextlib.closing(_Progress(config.logging.progress, start.step, t.max_steps)))
    held.release()
    stop = _StopSignal()
    closing.callback(stop.restore)
    loop = _Loop(config, config_dict, run, checkpointer, writers, progress, stop, start)
    loop.train(state, batches, evaluate_params)
    return loop.summary(workdir)


@dataclasses.dataclass(frozen=True)
class _Start:
    """Where this invocation starts, from the restored checkpoint's metadata (all 0 for a fresh run)."""

    step: int
    data_position: int  # global batches consumed; any process count reads on from it
    tokens_seen: int
    elapsed_s: float
    best_val_loss: float  # over the run's evaluations so far (inf: none yet)

    @classmethod
    def of(cls, meta: dict[str, Any]) -> _Start:
        step = int(meta.get("step", 0))
        best = meta.get("best_val_loss")
        return cls(step, int(meta.get("data_position", step)), int(meta.get("tokens_seen", 0)),
                   float(meta.get("elapsed_s", 0.0)), math.inf if best is None else float(best))


class _Clock:
    """Wall time of the whole run (earlier invocations included), and tokens/s between logged steps."""

    def __init__(self, elapsed_before: float, step: int):
        self.start = self.window_start = time.perf_counter()
        self.elapsed_before, self.window_step = elapsed_before, step

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start

    def restart_window(self, step: int) -> None:
        self.window_start, self.window_step = time.perf_counter(), step

    def tokens_per_sec(self, step: int, tokens_per_step: int) -> float:
        """Throughput since the window started; starts the next window."""
        now = time.perf_counter()
        rate = (step - self.window_step) * tokens_per_step / max(now - self.window_start, 1e-9)
        self.window_start, self.window_step = now, step
        return rate


class _Loop:
    """The training loop and where it stands: step, best validation loss, last saved step."""

    def __init__(self, config: Any, config_dict: dict[str, Any], run: Run, checkpointer: Checkpointer,
                 writers: MetricWriters, progress: _Progress, stop: _StopSignal, start: _Start):
        self.config, self.config_dict, self.t, self.run = config, config_dict, config.train, run
        self.checkpointer, self.writers, self.progress, self.stop = checkpointer, writers, progress, stop
        self.step = self.first_step = self.last_saved = start.step
        self.data_position, self.tokens_at_start = start.data_position, start.tokens_seen
        self.clock = _Clock(start.elapsed_s, self.step)
        self.tokens_per_step = self.t.global_batch_size * config.data.seq_len
        self.best_val, self.val_loss, self.asked = start.best_val_loss, None, False
        self.cfg, self.seq_len = run.model.config, config.data.seq_len
        self.peak, _ = peak_flops_per_device(self.t.peak_flops, dtype=run.model.dtype,
                                             device=run.mesh.local_mesh.devices.flat[0])

    def tokens_seen(self, step: int) -> int:
        return self.tokens_at_start + (step - self.first_step) * self.tokens_per_step

    def finished(self) -> bool:
        t = self.t
        return bool(self.step >= t.max_steps or (t.max_tokens and self.tokens_seen(self.step) >= t.max_tokens)
                    or (t.stop_after and self.step >= t.stop_after))

    def train(self, state: Any, batches: Any, evaluate_params: Any) -> None:
        """Step until the run is finished, its time is up or a stop is asked for; save at the end."""
        t, save_every = self.t, self.config.checkpoint.save_every
        pending = None  # (step, metrics) of the step before the one just dispatched
        while not self.finished():
            state, metrics = self.run.train_step(state, next(batches))
            self.checkpointer.check()
            self.step += 1
            self.val_loss = None
            if pending is not None:  # read back one step late: the device is already busy with this step
                self._read_back(*pending, log=pending[0] % t.log_every == 0)
            pending = (self.step, metrics)
            self.asked, time_up = self._limits()
            end = self.finished() or time_up
            evaluate_now = t.eval_every and (self.step % t.eval_every == 0 or end)
            save_now = save_every and self.step % save_every == 0
            if evaluate_now or save_now or end or self.asked:
                # Nothing from a non-finite step reaches an evaluation or a checkpoint.
                self._read_back(self.step, metrics, log=self.step % t.log_every == 0 or end or self.asked)
                pending = None
            if evaluate_now:
                new_best = self._evaluate(evaluate_params(state.params))
                # The best model so far is kept (checkpoint.keep_best), so it must be saved when it is seen.
                save_now = save_now or (new_best and self.config.checkpoint.keep_best > 0 and not end)
            if save_now:
                self._save(state)
            if end or self.asked:
                break
        if pending is not None:
            self._read_back(*pending, log=True)
        if self.step != self.last_saved:
            self._save(state)
        self.checkpointer.wait()

    def _limits(self) -> tuple[bool, bool]:
        """(a stop was asked for, the time limit is reached). Each process has its own clock and
        signals; several processes act on them together, at logged steps, or their collectives would
        no longer match. Preemption notices are agreed on at every step (by JAX)."""
        asked = self.stop.received is not None
        time_up = bool(self.t.max_time_s and self.clock.elapsed() >= self.t.max_time_s)
        if jax.process_count() == 1:
            return asked, time_up
        agree_now = self.step % self.t.log_every == 0
        asked = (agree_now and any_process(asked)) or self.checkpointer.preempted(self.step)
        return asked, agree_now and any_process(time_up)

    def _read_back(self, step: int, metrics: Any, log: bool) -> None:
        """Fetch the metrics of `step` from the device; write and show them when `log`. A non-finite
        loss stops the run."""
        m = jax.device_get(metrics if log else {"loss": metrics["loss"]})  # one transfer per step, not four
        if not np.isfinite(m["loss"]) and not self.t.skip_nonfinite:
            raise FloatingPointError(f"Non-finite loss ({m['loss']}) at step {step}; stopped without saving it "
                                     f"(the last checkpoint is step {self.last_saved}). Lower optim.lr, or set "
                                     "train.skip_nonfinite=True to skip such updates.")
        if not log:
            if step == self.first_step + 1:  # compilation ends with the first step: time throughput from here
                self.clock.restart_window(step)
            self.progress.step(None)
            return
        tok_s = self.clock.tokens_per_sec(step, self.tokens_per_step)
        keys = float(m.get("attended_keys", causal_keys(self.seq_len)))  # causal, or what documents allow
        row = {"step": step, "loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
               "tokens_per_sec": tok_s, "mfu": self._mfu(tok_s, keys),
               "mfu_full_square": self._mfu(tok_s, None), "tokens_seen": self.tokens_seen(step),
               "elapsed_s": self.clock.elapsed()}
        if self.t.skip_nonfinite:
            row["skipped"] = bool(m["skipped"])
        row.update({k: float(v) for k, v in m.items() if k.startswith(("rewards/", "logps/"))})  # preference tuning
        self.writers.write(row)
        self.progress.step(row)

    def _mfu(self, tok_s: float, keys: float | None) -> float:
        """MFU with attention over `keys` keys per query (None: the full square; model/flops.py)."""
        return mfu(tok_s, flops_per_token(self.cfg, self.seq_len, keys), self.peak, self.run.mesh.size)

    def _evaluate(self, ev: dict[str, float]) -> bool:
        """Write and show an evaluation; whether it is the run's best so far."""
        self.val_loss = ev["val_loss"]
        new_best = self.val_loss < self.best_val
        self.best_val = min(self.best_val, self.val_loss)
        self.writers.write({"step": self.step, **ev, "tokens_seen": self.tokens_seen(self.step),
                            "elapsed_s": self.clock.elapsed()})
        tasks = "".join(f" | {k.removeprefix('task/')} {v:.4f}" for k, v in ev.items() if k.startswith("task/"))
        shown = (f"val_ppl {ev['val_ppl']:.2f} | val_bpc {ev['val_bpc']:.4f}" if "val_ppl" in ev else
                 f"val_rewards/accuracies {ev['val_rewards/accuracies']:.4f} | val_rewards/margins "
                 f"{ev['val_rewards/margins']:.4f}")
        self.progress.message(f"step {self.step:6d} | val_loss {self.val_loss:.4f} | {shown}{tasks}")
        return new_best

    def _save(self, state: Any) -> None:
        meta = {"data_position": self.data_position + self.step - self.first_step,
                "tokens_seen": self.tokens_seen(self.step), "elapsed_s": self.clock.elapsed(),
                "best_val_loss": None if math.isinf(self.best_val) else self.best_val, "config": self.config_dict}
        self.checkpointer.save(self.step, state, meta, val_loss=self.val_loss)
        self.writers.flush()
        self.last_saved = self.step

    def summary(self, workdir: epath.Path) -> dict[str, Any]:
        if self.asked:
            reason = self.stop.received or "a stop signal to another process, or a preemption notice"
            where = self.checkpointer.directory / str(self.step)
            self.progress.message(f"{reason}: saved step {self.step} to {where}.")
        run_s = time.perf_counter() - self.clock.start
        return {"step": self.step, "tokens_seen": self.tokens_seen(self.step), "best_val_loss": self.best_val,
                "elapsed_s": self.clock.elapsed(),
                "tokens_per_sec": (self.step - self.first_step) * self.tokens_per_step / max(run_s, 1e-9),
                "workdir": str(workdir), "stopped_by": self.stop.received or ("preemption" if self.asked else None)}
