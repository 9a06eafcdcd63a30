"""The training loop: data -> train step -> metrics, evaluation, checkpoints, preemption.

`train(config, workdir)` is what `scripts/train.py` runs. One iteration: the next batch from the
Grain iterator is placed on the mesh, the jitted step updates the state, and the previous step's
metrics are read back (one step late, so the host never waits for the device it just fed). Every
`eval_every` steps the validation split is evaluated; every `save_every` steps, at the end and on
SIGTERM/SIGINT the state, the iterator position and the metadata are saved together.
"""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lightjax.checkpoint import Checkpointer, CheckpointError, config_changes
from lightjax.data.pipeline import check_vocab, eval_batches, train_iterator
from lightjax.data.sources import load_split
from lightjax.data.tokenizers import Tokenizer, load_tokenizer, make_tokenizer
from lightjax.metrics import flops_per_token, mfu, peak_flops_per_device
from lightjax.sharding import shard_batch
from lightjax.train_step import Training, setup_training


class _StopSignal:
    """First SIGTERM/SIGINT: finish the step, save, exit cleanly. Second SIGINT: abort at once."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class MetricsWriter:
    """WORKDIR/metrics.jsonl, one JSON object per logged step (and per evaluation)."""

    def __init__(self, workdir: Path, resume_step: int):
        self.path = workdir / "metrics.jsonl"
        if self.path.exists():  # rows after the restored step were never checkpointed: drop them
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            kept = [r for r in rows if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a")  # noqa: SIM115 (kept open for the run)

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _tokenizer(config: Any, workdir: Path, train_docs: Any) -> Tokenizer:
    """The run's tokenizer: the one saved in WORKDIR/tokenizer/ when resuming, else built and saved."""
    saved = workdir / "tokenizer"
    if (saved / "tokenizer.json").exists():
        return load_tokenizer(saved)
    tokenizer = make_tokenizer(config.data.tokenizer, train_docs)
    if jax.process_index() == 0:
        tokenizer.save(saved)
    return tokenizer


def evaluate(training: Training, params: Any, docs: Any, tokenizer: Tokenizer, config: Any) -> dict[str, float]:
    nll, count = 0.0, 0.0
    local_batch = config.train.global_batch_size // jax.process_count()
    for batch in eval_batches(docs, tokenizer, config.data.seq_len, local_batch,
                              max_batches=config.train.eval_batches):
        out = training.eval_step(params, shard_batch(batch, training.mesh))
        nll, count = nll + float(out["nll_sum"]), count + float(out["tokens"])
    loss = nll / max(count, 1.0)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def _resume(config: Any, workdir: Path, checkpointer: Checkpointer, training: Training,
            data_iter: Any, config_dict: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(state, meta): restored per config.checkpoint.resume, or freshly initialised."""
    mode = config.checkpoint.resume
    if mode == "never":
        return training.init_state(), {}
    source = checkpointer
    if mode != "auto":
        path = Path(mode)
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path
        if not (run_dir / "checkpoints").is_dir():
            raise CheckpointError(f"config.checkpoint.resume={mode!r}: no checkpoints/ under {run_dir}.")
        source = Checkpointer(run_dir, async_save=False)
    steps = source.steps()
    if not steps:
        if mode != "auto":
            raise CheckpointError(f"config.checkpoint.resume={mode!r}: no complete checkpoint there.")
        return training.init_state(), {}
    saved_config = source.read_meta(steps[-1]).get("config", {})
    changes = config_changes(saved_config, config_dict)
    if changes:
        raise CheckpointError("Cannot resume: these settings differ from the checkpoint's run: "
                              + "; ".join(changes) + ". Use a new --workdir or --config.checkpoint.resume=never.")
    restored = source.restore_latest(training.abstract_state(), data_iter)
    if restored is None:
        raise CheckpointError(f"No checkpoint under {source.directory} could be read.")
    state, meta = restored
    print(f"Resumed from {source.directory / str(meta['step'])} (step {meta['step']}).", flush=True)
    return state, meta


def train(config: Any, workdir: str | Path) -> dict[str, Any]:
    """Run (or resume) training as configured; returns a summary of the run."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    training = setup_training(config)
    cfg, t = training.model_config, config.train
    config_dict = json.loads(config.to_json_best_effort())
    (workdir / "config.json").write_text(json.dumps(config_dict, indent=1))

    train_docs, val_docs = load_split(config.data, "train"), load_split(config.data, "validation")
    tokenizer = _tokenizer(config, workdir, train_docs)
    check_vocab(tokenizer, cfg.vocab_size)
    local_batch = t.global_batch_size // jax.process_count()
    data_iter = train_iterator(train_docs, tokenizer, config.data.seq_len, local_batch, t.seed,
                               config.data.num_workers, shuffle_window=config.data.shuffle_window)

    checkpointer = Checkpointer(workdir, config.checkpoint.keep, config.checkpoint.async_save)
    state, meta = _resume(config, workdir, checkpointer, training, data_iter, config_dict)
    step = int(meta.get("step", 0))
    tokens_seen = int(meta.get("tokens_seen", 0))
    elapsed_before = float(meta.get("elapsed_s", 0.0))
    writer = MetricsWriter(workdir, step)
    stop = _StopSignal()

    flops_tok = flops_per_token(cfg, config.data.seq_len)
    peak, _ = peak_flops_per_device(t.peak_flops, dtype=training.model.dtype)
    tokens_per_step = t.global_batch_size * config.data.seq_len
    start = time.perf_counter()
    last_log_time, last_log_step = start, step
    best_val, val_loss, last_saved = math.inf, None, step

    def save(step: int) -> None:
        nonlocal last_saved
        elapsed = elapsed_before + time.perf_counter() - start
        checkpointer.save(step, state, data_iter, {"tokens_seen": tokens_seen, "elapsed_s": elapsed,
                                                    "config": config_dict}, val_loss=val_loss)
        last_saved = step

    def done(step: int) -> bool:
        elapsed = elapsed_before + time.perf_counter() - start
        return (step >= t.max_steps or (t.max_tokens and tokens_seen >= t.max_tokens)
                or (t.max_time_s and elapsed >= t.max_time_s) or (t.stop_after and step >= t.stop_after))

    try:
        while not done(step) and not stop.received:
            batch = shard_batch(next(data_iter), training.mesh)
            state, metrics = training.train_step(state, batch)
            step += 1
            tokens_seen += tokens_per_step
            val_loss = None
            if step % t.log_every == 0 or done(step):
                now = time.perf_counter()
                m = jax.device_get(metrics)
                if not np.isfinite(m["loss"]):
                    raise FloatingPointError(f"Non-finite loss {m['loss']} at step {step}; nothing was saved "
                                             "from it. Lower optim.lr or enable clipping.")
                tok_s = (step - last_log_step) * tokens_per_step / max(now - last_log_time, 1e-9)
                row = {"step": step, "loss": float(m["loss"]), "lr": float(m["lr"]),
                       "grad_norm": float(m["grad_norm"]), "tokens_per_sec": tok_s,
                       "mfu": mfu(tok_s, flops_tok, peak, training.mesh.size), "tokens_seen": tokens_seen,
                       "elapsed_s": elapsed_before + now - start}
                writer.write(row)
                print(f"step {step:6d} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | {tok_s:,.0f} tok/s",
                      flush=True)
                last_log_time, last_log_step = now, step
            if t.eval_every and (step % t.eval_every == 0 or done(step)):
                ev = evaluate(training, state.params, val_docs, tokenizer, config)
                val_loss = ev["val_loss"]
                best_val = min(best_val, val_loss)
                writer.write({"step": step, **ev, "tokens_seen": tokens_seen,
                              "elapsed_s": elapsed_before + time.perf_counter() - start})
                print(f"step {step:6d} | val_loss {val_loss:.4f} | val_ppl {ev['val_ppl']:.2f}", flush=True)
            if config.checkpoint.save_every and step % config.checkpoint.save_every == 0:
                save(step)
            if checkpointer.preempted(step):
                stop.received = "preemption notice"
        if stop.received or done(step):
            if step != last_saved:
                save(step)
            checkpointer.wait()
            if stop.received:
                print(f"{stop.received}: saved step {step} to {checkpointer.directory / str(step)}.", flush=True)
    finally:
        stop.restore()
        checkpointer.wait()
        checkpointer.close()
        writer.close()
        if hasattr(data_iter, "close"):
            data_iter.close()
    return {"step": step, "tokens_seen": tokens_seen, "best_val_loss": best_val,
            "elapsed_s": elapsed_before + time.perf_counter() - start, "workdir": str(workdir)}
