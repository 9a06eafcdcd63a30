"""The training loop: data -> train step -> metrics, evaluation, checkpoints, preemption.

`train(config, workdir)` is what `scripts/train.py` runs. One iteration: the next batch from the
Grain iterator is placed on the mesh, the jitted step updates the state, and the previous step's
metrics are read back (one step late, so the host never waits for the device it just fed). Every
`eval_every` steps the validation split is evaluated; every `save_every` steps, at the end and on
SIGTERM/SIGINT the state, the data position and the metadata are saved together.

In a multi-process job every process runs this same loop on its slice of each global batch; process
0 alone writes the run's files and prints (see distributed.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from lightjax.checkpoint import (
    Checkpointer,
    CheckpointError,
    absolute,
    check_same_architecture,
    config_changes,
    load_weights,
)
from lightjax.data.pipeline import (
    TokenRows,
    check_vocab,
    open_tokens,
    read_token_meta,
    train_iterator,
    write_token_file,
)
from lightjax.data.sources import load_split, prepare_source
from lightjax.data.tokenizers import Tokenizer, load_tokenizer, make_tokenizer
from lightjax.distributed import any_process, is_leader, print_once, run_once
from lightjax.evaluate import evaluate
from lightjax.files import WorkdirLock
from lightjax.metrics import MetricWriters, flops_per_token, mfu, peak_flops_per_device, plot_losses, write_metrics_csv
from lightjax.run import Run, build_run
from lightjax.sharding import shard_batch


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


def _tokenizer(config: Any, workdir: epath.Path) -> Tokenizer:
    """The run's tokenizer: the one saved in WORKDIR/tokenizer/ when resuming, else built (once, by
    process 0, from the training split) and saved there; every process then loads the saved one."""
    saved = workdir / "tokenizer"

    def build() -> None:
        if not (saved / "tokenizer.json").exists():
            prepare_source(config.data)
            train_docs = load_split(config.data, "train") if config.data.tokenizer == "char" else None
            make_tokenizer(config.data.tokenizer, train_docs).save(saved)

    run_once("building the tokenizer", build)
    return load_tokenizer(saved)


# The data keys a prepared token file depends on; any change prepares it again.
_TOKEN_FILE_KEYS = ("source", "tokenizer", "text_field", "val_split", "val_fraction")


def _token_files(config: Any, workdir: epath.Path, tokenizer: Tokenizer) -> dict[str, epath.Path]:
    """{train,validation}.tokens in config.data.tokens_dir (default WORKDIR/data): the splits tokenized,
    written by process 0 when missing or made from other data settings. Only process 0 ever reads the
    data source; the others read these."""
    directory = epath.Path(config.data.tokens_dir) if config.data.tokens_dir else workdir / "data"
    paths = {split: directory / f"{split}.tokens" for split in ("train", "validation")}
    provenance = {k: config.data[k] for k in _TOKEN_FILE_KEYS}

    def prepare() -> None:
        prepare_source(config.data)
        for split, path in paths.items():
            meta = read_token_meta(path)
            if meta is None or any(meta.get(k) != v for k, v in provenance.items()):
                start = time.perf_counter()
                meta = write_token_file(load_split(config.data, split), tokenizer, path, provenance)
                print(f"Prepared {meta['tokens']:,} {split} tokens into {path} in {time.perf_counter() - start:.1f} s.",
                      flush=True)

    run_once("preparing the data", prepare)
    return paths


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
        return _fresh_state(config, run), {}
    if mode == "auto":
        restored = checkpointer.restore_latest(run.abstract_state, same_run)
        if restored is None:
            raise CheckpointError(f"No checkpoint under {checkpointer.directory} could be read.")
        where = checkpointer.directory / str(restored[1]["step"])
    else:
        restored, where = _restore_from(mode, run, same_run)
    print_once(f"Resumed from {where} (step {restored[1]['step']}) on {jax.process_count()} process(es).")
    return restored


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


def _fresh_state(config: Any, run: Run) -> Any:
    source = config.train.init_from
    if not source:
        return run.init_state()
    weights_cfg, params = load_weights(source)
    check_same_architecture(run.model.config, weights_cfg, source)
    print_once(f"Starting from the weights in {source}.")
    return run.init_state(params)


class _Progress:
    """A progress bar (loss, tokens/s, MFU, ETA) on a terminal; plain log lines otherwise."""

    def __init__(self, enabled: bool, start_step: int, max_steps: int):
        self.bar = None
        if enabled and sys.stdout.isatty() and jax.process_index() == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def step(self, row: dict[str, Any] | None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if row is not None:
                self.bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_sec']:,.0f}",
                                     mfu=f"{100 * row['mfu']:.1f}%")
        elif row is not None and jax.process_index() == 0:
            print(f"step {row['step']:6d} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | grad_norm "
                  f"{row['grad_norm']:.3f} | {row['tokens_per_sec']:,.0f} tok/s | MFU {100 * row['mfu']:.1f}%",
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


def _prepare(config: Any, workdir: epath.Path) -> tuple[Run, Sequence[np.ndarray], Any, float]:
    """What the loop needs before the first step: the built steps, the training rows, the validation
    tokens and their tokens per character (each file prepared once, by process 0)."""
    run = build_run(config)
    tokenizer = _tokenizer(config, workdir)
    check_vocab(tokenizer, run.model.config.vocab_size)
    paths = _token_files(config, workdir, tokenizer)
    val_meta = read_token_meta(paths["validation"])
    tokens_per_char = val_meta["tokens"] / max(val_meta["characters"], 1)
    return run, TokenRows(paths["train"], config.data.seq_len), open_tokens(paths["validation"]), tokens_per_char


def train(config: Any, workdir: str | epath.PathLike) -> dict[str, Any]:
    """Run (or resume) training as configured, holding the workdir's lock (process 0 holds it for the
    job; a second trainer on the same workdir is refused); returns a summary of the run."""
    workdir = absolute(workdir)

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
    run, rows, val_tokens, tokens_per_char = _prepare(config, workdir)
    closing.callback(rows.close)
    if hasattr(val_tokens, "close"):
        closing.callback(val_tokens.close)
    cfg, t = run.model.config, config.train
    config_dict = json.loads(config.to_json_best_effort())

    checkpointer = Checkpointer(workdir, config.checkpoint.keep, config.checkpoint.async_save)
    closing.callback(checkpointer.close)
    closing.callback(checkpointer.wait)  # first: a save in flight finishes before the manager closes
    state, meta = _resume(config, checkpointer, run, config_dict)
    if is_leader():
        (workdir / "config.json").write_text(json.dumps(config_dict, indent=1))
    step = int(meta.get("step", 0))
    position = int(meta.get("data_position", step))  # global batches consumed; any process count reads on from it
    data_iter = train_iterator(rows, t.global_batch_size, t.seed, config.data.num_workers, start_step=position)
    if hasattr(data_iter, "close"):
        closing.callback(data_iter.close)
    tokens_seen = tokens_at_start = int(meta.get("tokens_seen", 0))
    elapsed_before = float(meta.get("elapsed_s", 0.0))
    writers = closing.enter_context(contextlib.closing(
        MetricWriters(workdir, step, config.logging.tensorboard, config.logging.wandb_project, config_dict)))
    progress = closing.enter_context(contextlib.closing(_Progress(config.logging.progress, step, t.max_steps)))
    stop = _StopSignal()
    closing.callback(stop.restore)

    flops_tok = flops_per_token(cfg, config.data.seq_len)
    peak, _ = peak_flops_per_device(t.peak_flops, dtype=run.model.dtype,
                                    device=run.mesh.local_mesh.devices.flat[0])
    tokens_per_step = t.global_batch_size * config.data.seq_len
    start = time.perf_counter()
    window = {"time": start, "step": step}  # throughput is measured between logged steps
    best_val, val_loss, last_saved = math.inf, None, step
    first_step = step

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - start

    def finished(step: int) -> bool:
        return bool(step >= t.max_steps or (t.max_tokens and tokens_seen >= t.max_tokens)
                    or (t.stop_after and step >= t.stop_after))

    def limits(step: int) -> tuple[bool, bool]:
        """(a stop was asked for, the time limit is reached). Each process has its own clock and
        signals; several processes act on them together (at logged steps), or their collectives
        would no longer match."""
        asked = stop.received is not None
        time_up = bool(t.max_time_s and elapsed() >= t.max_time_s)
        if jax.process_count() == 1:
            return asked, time_up
        if step % t.log_every:
            return checkpointer.preempted(step), False
        return any_process(asked) or checkpointer.preempted(step), any_process(time_up)

    def read_back(step: int, metrics: Any, log: bool) -> dict[str, Any] | None:
        """The metrics of `step`, fetched from the device; stops the run on a non-finite loss."""
        m = jax.device_get(metrics)
        if not np.isfinite(m["loss"]) and not t.skip_nonfinite:
            raise FloatingPointError(f"Non-finite loss ({m['loss']}) at step {step}; stopped without saving it "
                                     f"(the last checkpoint is step {last_saved}). Lower optim.lr, or set "
                                     "train.skip_nonfinite=True to skip such updates.")
        now = time.perf_counter()
        if not log:
            if step == first_step + 1:  # compilation ends with the first step: time throughput from here
                window.update(time=now, step=step)
            return None
        tok_s = (step - window["step"]) * tokens_per_step / max(now - window["time"], 1e-9)
        window.update(time=now, step=step)
        row = {"step": step, "loss": float(m["loss"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
               "tokens_per_sec": tok_s, "mfu": mfu(tok_s, flops_tok, peak, run.mesh.size),
               "tokens_seen": tokens_at_start + (step - first_step) * tokens_per_step, "elapsed_s": elapsed()}
        if t.skip_nonfinite:
            row["skipped"] = bool(m["skipped"])
        writers.write(row)
        return row

    def save(step: int) -> None:
        nonlocal last_saved
        checkpointer.save(step, state, {"data_position": position + step - first_step, "tokens_seen": tokens_seen,
                                        "elapsed_s": elapsed(), "config": config_dict}, val_loss=val_loss)
        writers.flush()
        last_saved = step

    pending, asked = None, False  # pending: (step, metrics) of the step before the one just dispatched
    while not finished(step):
        batch = shard_batch(next(data_iter), run.mesh)
        state, metrics = run.train_step(state, batch)
        checkpointer.check()
        step += 1
        tokens_seen += tokens_per_step
        val_loss = None
        if pending is not None:  # read back one step late: the device is already busy with `step`
            p_step, p_metrics = pending
            progress.step(read_back(p_step, p_metrics, p_step % t.log_every == 0))
        pending = (step, metrics)
        asked, time_up = limits(step)
        end = finished(step) or time_up
        evaluate_now = t.eval_every and (step % t.eval_every == 0 or end)
        save_now = config.checkpoint.save_every and step % config.checkpoint.save_every == 0
        if evaluate_now or save_now or end or asked:
            progress.step(read_back(step, metrics, step % t.log_every == 0 or end or asked))
            pending = None  # nothing from a non-finite step reaches an evaluation or a checkpoint
        if evaluate_now:
            ev = evaluate(run, state.params, val_tokens, config, tokens_per_char)
            val_loss = ev["val_loss"]
            best_val = min(best_val, val_loss)
            writers.write({"step": step, **ev, "tokens_seen": tokens_seen, "elapsed_s": elapsed()})
            progress.message(f"step {step:6d} | val_loss {val_loss:.4f} | val_ppl {ev['val_ppl']:.2f} | "
                             f"val_bpc {ev['val_bpc']:.4f}")
        if save_now:
            save(step)
        if end or asked:
            break
    if pending is not None:
        progress.step(read_back(*pending, log=True))
    if step != last_saved:
        save(step)
    checkpointer.wait()
    if asked:
        reason = stop.received or "a stop signal to another process, or a preemption notice"
        progress.message(f"{reason}: saved step {step} to {checkpointer.directory / str(step)}.")
    run_s = time.perf_counter() - start
    return {"step": step, "tokens_seen": tokens_seen, "best_val_loss": best_val, "elapsed_s": elapsed(),
            "tokens_per_sec": (step - first_step) * tokens_per_step / max(run_s, 1e-9), "workdir": str(workdir),
            "stopped_by": stop.received or ("preemption" if asked else None)}
