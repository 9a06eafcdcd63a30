"""Grain pipelines over rows (rows.py): the global batches of training, and one pass for evaluation.

Training orders a split's rows globally:

    row order   = a seeded permutation of all rows, a new one each epoch (Grain's index shuffle:
                  nothing is materialised, any corpus size)
    global batch s = rows [s * B, (s + 1) * B) of that order        (B = train.global_batch_size)
    process p of P reads rows [s * B + p * B/P, s * B + (p + 1) * B/P) of it, and nothing else

So the batches are a function of the seed, the data and the step only: 1, 2 or 8 processes train on
the same global batches, each process reading only its slice from the file, and the iterator's whole
state is the step it starts from. A checkpoint written by any number of processes resumes on any other.

Evaluation reads the rows once, in order, each process its share, padded with fully masked rows so that
every process takes part in every batch.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import grain
import jax
import numpy as np

from lightjax.data.rows import Rows


def process_shard() -> tuple[int, int]:
    """(this process's index, the number of processes)."""
    return jax.process_index(), jax.process_count()


def train_dataset(rows: Rows, global_batch: int, seed: int, shard: tuple[int, int] | None = None,
                  start_step: int = 0) -> grain.IterDataset:
    """This process's slices of the global batches from step `start_step` on: dicts of `tokens`
    [global_batch / process count, seq_len + 1] and `mask` [global_batch / process count, seq_len]."""
    index, count = shard or process_shard()
    if global_batch % count:
        raise ValueError(f"config.train.global_batch_size={global_batch} must be divisible by the number of "
                         f"processes ({count}).")
    ds = grain.MapDataset.source(rows)
    if not getattr(rows, "in_training_order", False):  # a mixture's stream is (mixture.py)
        ds = ds.seed(seed).shuffle().repeat(None)
    # Blocks of B/P rows; global batch s is blocks s*P .. s*P + P-1, and block s*P + p is process p's.
    ds = ds.batch(global_batch // count, drop_remainder=True)
    return ds[start_step * count + index: sys.maxsize: count].to_iter_dataset()


def train_iterator(rows: Rows, global_batch: int, seed: int, num_workers: int = 0,
                   shard: tuple[int, int] | None = None, start_step: int = 0) -> grain.DatasetIterator:
    ds = train_dataset(rows, global_batch, seed, shard, start_step)
    if num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(ds)


def eval_batches(rows: Rows, batch_size: int, shard: tuple[int, int] | None = None,
                 max_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of one pass over `rows` in order (at most `max_batches` batches; 0: all):
    each row's arrays stacked (`tokens` [batch_size, seq_len + 1], `mask` [batch_size, seq_len], ...).
    Every process yields the same number of batches, padding with all-zero rows (fully masked)."""
    index, count = shard or process_shard()
    n_batches = -(-len(rows) // (batch_size * count))
    if max_batches:
        n_batches = min(n_batches, max_batches)
    shapes = {k: v.shape for k, v in rows[0].items()} if len(rows) else {}
    for b in range(n_batches):
        batch = {k: np.zeros((batch_size, *shape), np.int32) for k, shape in shapes.items()}
        for r in range(batch_size):
            row = (b * count + index) * batch_size + r  # process p takes every count-th block of rows
            if row < len(rows):
                for k, v in rows[row].items():
                    batch[k][r] = v
        yield batch
