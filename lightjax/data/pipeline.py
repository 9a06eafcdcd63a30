"""Grain pipelines: documents -> token batches [B, seq_len + 1] for the train and eval steps.

Training (endless, shuffled, checkpointable):

    documents --this process's shard (ShardByJaxProcess)--> seeded shuffle, reshuffled every epoch
      --> tokenize, EOS after each document (when the tokenizer has one)
      --> concat-then-split packing into rows of seq_len + 1 tokens (no padding, nothing dropped)
      --> window shuffle of the rows (a corpus of one long document, like Tiny Shakespeare, would
          otherwise give consecutive windows of the text in every batch)
      --> batch of global_batch_size / process_count rows --> optional worker processes

`shard` is (process index, process count), by default this JAX process's (ShardByJaxProcess).
Its iterator has `get_state()`/`set_state()` (small JSON): a restored iterator continues with exactly
the batches the original would have produced.

Evaluation (deterministic, one pass): the split's tokens cut into rows that overlap by one token,
so that every target token is predicted exactly once; the last rows are padded and masked out.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from lightjax.data.tokenizers import Tokenizer


class _Tokenize:
    """A picklable map function (Grain worker processes receive it)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> dict[str, np.ndarray]:
        ids = self.tokenizer.encode(text)
        if self.tokenizer.eos_id is not None:
            ids = np.append(ids, np.int32(self.tokenizer.eos_id))
        return {"tokens": ids.astype(np.int32)}


def process_shard() -> tuple[int, int]:
    """(this process's index, the number of processes), from grain's ShardByJaxProcess."""
    options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    return options.shard_index, options.shard_count


def shard_documents(docs: Sequence[str], shard: tuple[int, int] | None = None) -> grain.MapDataset:
    """This process's documents: every count-th one. A corpus of fewer documents than processes
    (Tiny Shakespeare's single training document) is first cut into `count` contiguous pieces per
    document, so that the shards are still disjoint and together the whole split."""
    index, count = shard or process_shard()
    if len(docs) < count:
        docs = [doc[len(doc) * p // count: len(doc) * (p + 1) // count] for doc in docs for p in range(count)]
    return grain.MapDataset.source(docs)[index::count]


def train_dataset(docs: Sequence[str], tokenizer: Tokenizer, seq_len: int, batch_size: int, seed: int,
                  shard: tuple[int, int] | None = None, shuffle_window: int = 4096) -> grain.IterDataset:
    """The training batches of one process: dicts with `tokens` [batch_size, seq_len + 1] int32."""
    ds = shard_documents(docs, shard)
    ds = ds.seed(seed).shuffle().repeat(None)  # a new order every epoch
    ds = ds.map(_Tokenize(tokenizer)).to_iter_dataset()
    ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len + 1})
    if shuffle_window > 1:
        ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=shuffle_window, seed=seed)
    return ds.batch(batch_size, drop_remainder=True)


def train_iterator(docs: Sequence[str], tokenizer: Tokenizer, seq_len: int, batch_size: int, seed: int,
                   num_workers: int = 0, shard: tuple[int, int] | None = None,
                   shuffle_window: int = 4096) -> grain.DatasetIterator:
    ds = train_dataset(docs, tokenizer, seq_len, batch_size, seed, shard, shuffle_window)
    if num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(ds)


def eval_batches(docs: Sequence[str], tokenizer: Tokenizer, seq_len: int, batch_size: int,
                 shard: tuple[int, int] | None = None, max_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of one pass over a split: `tokens` [batch_size, seq_len + 1] and `mask`
    [batch_size, seq_len] (1 for targets that count). Every process yields the same number of batches
    (all take part in each global batch), padding with fully masked rows."""
    tokens = eval_tokens(docs, tokenizer)
    if len(tokens) < seq_len + 1:
        raise ValueError(f"config.data.seq_len={seq_len} is longer than the validation split "
                         f"({len(tokens)} tokens); it needs at least seq_len + 1.")
    n_rows = -(-(len(tokens) - 1) // seq_len)
    index, count = shard or process_shard()
    n_batches = -(-n_rows // (batch_size * count))
    if max_batches:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        rows = np.zeros((batch_size, seq_len + 1), np.int32)
        mask = np.zeros((batch_size, seq_len), np.int32)
        for r in range(batch_size):
            row = (b * count + index) * batch_size + r  # process p takes every count-th block of rows
            if row >= n_rows:
                break
            piece = tokens[row * seq_len: row * seq_len + seq_len + 1]
            rows[r, : len(piece)] = piece
            mask[r, : len(piece) - 1] = 1
        yield {"tokens": rows, "mask": mask}


def eval_tokens(docs: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
    """The split as one token stream, EOS after each document when the tokenizer has one."""
    tokenize = _Tokenize(tokenizer)
    return np.concatenate([tokenize(docs[i])["tokens"] for i in range(len(docs))])


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Every token id must have an embedding row: checked before training starts."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(f"The {tokenizer.kind} tokenizer has {tokenizer.vocab_size} tokens but the model's "
                         f"vocab_size is {model_vocab_size}; set --config.model.vocab_size={tokenizer.vocab_size} "
                         "(or larger).")


def count_tokens(docs: Sequence[str], tokenizer: Tokenizer) -> dict[str, Any]:
    """Documents, characters and tokens of a split (scripts/prepare_data.py prints them)."""
    chars = sum(len(docs[i]) for i in range(len(docs)))
    tokens = len(eval_tokens(docs, tokenizer))
    return {"documents": len(docs), "characters": chars, "tokens": tokens,
            "tokens_per_char": tokens / max(chars, 1)}
