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

from lightjax.data.instructions import ExampleRows, PromptStyle, is_instruction_source, load_records, write_examples
from lightjax.data.pipeline import eval_batches, token_stream
from lightjax.data.sources import load_split, pieces
from lightjax.data.tokenizers import load_tokenizer
from lightjax.runtime.sharding import shard_batch
from lightjax.train.checkpoint import restore_params
from lightjax.train.metrics import append_row
from lightjax.train.run import Run, build_run


def text_units(docs: Any, num_tokens: int) -> dict[str, float]:
    """Tokens per character and per UTF-8 byte of a split of `num_tokens` tokens, to turn nats per token
    into bits per unit."""
    chars = nbytes = 0
    for i in range(len(docs)):
        for piece in pieces(docs[i]):  # a long document a piece at a time
            chars, nbytes = chars + len(piece), nbytes + len(piece.encode("utf-8"))
    return {"tokens_per_char": num_tokens / max(chars, 1), "tokens_per_byte": num_tokens / max(nbytes, 1)}


def evaluate(run: Run, params: Any, tokens: Any, config: Any, tokens_per_char: float,
             max_batches: int | None = None) -> dict[str, float]:
    """Validation loss, perplexity and bits per character of a split's token stream over `max_batches`
    batches (default config.train.eval_batches; 0: the whole split). Padding rows of the last batch are
    masked out."""
    nll, count = 0.0, 0.0
    local_batch = config.train.global_batch_size // jax.process_count()
    max_batches = config.train.eval_batches if max_batches is None else max_batches
    for batch in eval_batches(tokens, config.data.seq_len, local_batch, max_batches=max_batches):
        out = run.eval_step(params, shard_batch(batch, run.mesh))
        nll, count = nll + float(out["nll_sum"]), count + float(out["tokens"])
    loss = nll / max(count, 1.0)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_bpc": loss / math.log(2) * tokens_per_char,
            "val_tokens": count}


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
    params = jax.device_put(params, run.shardings.params)
    tokenizer = load_tokenizer(workdir / "tokenizer")
    if is_instruction_source(config.data.source):
        tokens, units = _instruction_rows(config, split, tokenizer)
    else:
        docs = load_split(config.data, split)
        tokens = token_stream(docs, tokenizer)  # tokenized once, for the units and the batches
        units = text_units(docs, len(tokens))
    ev = evaluate(run, params, tokens, config, units["tokens_per_char"], max_batches)
    row = {"step": step, "split": split, "eval_loss": ev["val_loss"], "eval_ppl": ev["val_ppl"],
           "eval_bpc": ev["val_bpc"], "eval_bpb": ev["val_loss"] / math.log(2) * units["tokens_per_byte"],
           "eval_tokens": int(ev["val_tokens"])}
    if write and jax.process_index() == 0:
        append_row(workdir, row)  # the training rows stay as they are
    return row


def _instruction_rows(config: Any, split: str, tokenizer: Any) -> tuple[ExampleRows, dict[str, float]]:
    """The split's instruction rows as training cut them, and the units of their response text (from the
    examples' metadata: the records are rendered once)."""
    d = config.data
    records = load_records(d.source, split, d.val_fraction)
    style = PromptStyle(d.prompt_style, d.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        meta = write_examples(records, style, tokenizer, f"{tmp}/{split}.examples.npz")
        rows = ExampleRows(f"{tmp}/{split}.examples.npz", d.seq_len, d.pack)
    tokens = meta["tokens"]
    return rows, {"tokens_per_char": tokens / max(meta["characters"], 1),
                  "tokens_per_byte": tokens / max(meta["bytes"], 1)}
