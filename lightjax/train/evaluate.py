"""Evaluation over a split: loss (nats per token), perplexity, bits per character and per byte.

`evaluate` is what the trainer runs every `eval_every` steps; `evaluate_run` evaluates a saved run's
checkpoint over a whole split (what `scripts/evaluate.py` prints and appends to the run's metrics).
Bits per character and per byte divide out the tokenizer, so runs with different tokenizers compare.
"""

from __future__ import annotations

import math
import tempfile
from typing import Any

import jax
from etils import epath

from lightjax.data.pipeline import eval_batches
from lightjax.data.prepare import split_suffix, write_split
from lightjax.data.rows import Rows, open_rows
from lightjax.data.tokens import text_units
from lightjax.runtime.sharding import shard_batch
from lightjax.train.checkpoint import restore_params
from lightjax.train.metrics import append_row
from lightjax.train.run import Run, build_run


def evaluate(run: Run, params: Any, rows: Rows, config: Any, tokens_per_char: float,
             max_batches: int | None = None) -> dict[str, float]:
    """Validation loss, perplexity and bits per character of a split's rows over `max_batches` batches
    (default config.train.eval_batches; 0: the whole split). Padding is masked out."""
    nll, count = 0.0, 0.0
    local_batch = config.train.global_batch_size // jax.process_count()
    max_batches = config.train.eval_batches if max_batches is None else max_batches
    for batch in eval_batches(rows, local_batch, max_batches=max_batches):
        out = run.eval_step(params, shard_batch(batch, run.mesh))
        nll, count = nll + float(out["nll_sum"]), count + float(out["tokens"])
    loss = nll / max(count, 1.0)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_bpc": loss / math.log(2) * tokens_per_char,
            "val_tokens": count}


def evaluate_preference(run: Run, params: Any, rows: Rows, config: Any,
                        max_batches: int | None = None) -> dict[str, float]:
    """Preference tuning's validation over `max_batches` batches of held-out pairs (default
    config.train.eval_batches; 0: all): val_loss (the objective per pair) and TRL's metrics as
    val_rewards/..., val_logps/... (means over the pairs)."""
    sums: dict[str, float] = {}
    local_batch = config.train.global_batch_size // jax.process_count()
    max_batches = config.train.eval_batches if max_batches is None else max_batches
    for batch in eval_batches(rows, local_batch, max_batches=max_batches):
        out = run.eval_step(params, shard_batch(batch, run.mesh))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    pairs = max(sums.pop("pairs", 0.0), 1.0)
    out = {"val_loss": sums.pop("loss", 0.0) / pairs, "val_pairs": pairs}
    return {**out, **{f"val_{k}": v / pairs for k, v in sums.items()}}


def evaluate_sources(run: Run, params: Any, rows: dict[str, Rows], config: Any, tokens_per_char: dict[str, float],
                     weights: tuple[float, ...]) -> dict[str, float]:
    """A mixture's evaluation: each source's validation loss and bits per character (val_loss/NAME,
    val_bpc/NAME), and as val_loss, val_bpc their means under the mixture's starting weights (fixed, so
    that evaluations of one run compare, whatever its schedule)."""
    per_source = {name: evaluate(run, params, r, config, tokens_per_char[name]) for name, r in rows.items()}
    out: dict[str, float] = {}
    for key in ("val_loss", "val_bpc"):
        out[key] = sum(w * ev[key] for w, ev in zip(weights, per_source.values(), strict=True))
    out["val_ppl"] = math.exp(min(out["val_loss"], 50.0))
    out["val_tokens"] = sum(ev["val_tokens"] for ev in per_source.values())
    for name, ev in per_source.items():
        out[f"val_loss/{name}"], out[f"val_bpc/{name}"] = ev["val_loss"], ev["val_bpc"]
    return out


def evaluate_run(workdir: str | epath.PathLike, split: str = "validation", step: int | str | None = None,
                 max_batches: int = 0, local_path: str | None = None, write: bool = True) -> dict[str, Any]:
    """Evaluate a run's checkpoint (default: the latest) over a split with the run's own tokenizer,
    sequence length and batch size, on this machine's devices (data parallel). With `write`, appends
    a row to WORKDIR/metrics.jsonl: step, split, eval_loss, eval_ppl, eval_bpc, eval_bpb, eval_tokens."""
    workdir = epath.Path(workdir)
    config, params, step = restore_params(workdir, step)
    with config.unlocked():
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
        if local_path:
            config.data.local_path = local_path
    run = build_run(config)
    if run.preference:
        raise ValueError(f"{workdir} is a preference-tuning run: its validation (val_loss per pair, val_rewards/...) "
                         "is in its metrics.jsonl at every evaluation; score it on tasks with --tasks.")
    params = jax.device_put(params, run.shardings.params)
    with tempfile.TemporaryDirectory() as tmp:  # the split tokenized as training prepared its files
        path = f"{tmp}/{split}{split_suffix(config.data)}"
        units = text_units(write_split(config.data, split, workdir / "tokenizer", path))
        rows = open_rows(path, config.data.seq_len, training=False, pack=config.data.pack,
                         document_mask=config.data.get("document_mask", False))  # runs from before it had none
        try:
            ev = evaluate(run, params, rows, config, units["tokens_per_char"], max_batches)
        finally:
            rows.close()
    row = {"step": step, "split": split, "eval_loss": ev["val_loss"], "eval_ppl": ev["val_ppl"],
           "eval_bpc": ev["val_bpc"], "eval_bpb": ev["val_loss"] / math.log(2) * units["tokens_per_byte"],
           "eval_tokens": int(ev["val_tokens"])}
    if write and jax.process_index() == 0:
        append_row(workdir, row)  # the training rows stay as they are
    return row
