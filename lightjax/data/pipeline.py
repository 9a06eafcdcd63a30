"""Grain pipelines: documents -> token batches [B, seq_len + 1] for the train and eval steps.

Training reads a run's training split as one token stream on disk, prepared once (process 0, before
the first step):

    documents --tokenize, EOS after each document (when the tokenizer has one)--> one token stream
      --> WORKDIR/data/train.tokens (uint16 or uint32) + train.json (its length, dtype, provenance)

and cuts it into rows of seq_len + 1 tokens that overlap by one token (row i starts at token
i * seq_len), so that every token is a target once per epoch. The rows are then ordered globally:

    row order   = a seeded permutation of all rows, a new one each epoch (Grain's index shuffle:
                  nothing is materialised, any corpus size)
    global batch s = rows [s * B, (s + 1) * B) of that order        (B = train.global_batch_size)
    process p of P reads rows [s * B + p * B/P, s * B + (p + 1) * B/P) of it, and nothing else

So the batches are a function of the seed, the data and the step only: 1, 2 or 8 processes train on
the same global batches, each process reading only its slice from the file, and the iterator's whole
state is the step it starts from. A checkpoint written by any number of processes resumes on any other.

Evaluation (deterministic, one pass): the split's tokens cut into rows that overlap by one token,
so that every target token is predicted exactly once; the last rows are padded and masked out.
"""

from __future__ import annotations

import json
import sys
import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np
from etils import epath

from lightjax.data.instructions import ExampleRows, example_batches
from lightjax.data.sources import TextFile, pieces
from lightjax.data.tokenizers import Tokenizer


def encode_document(doc: str | TextFile, tokenizer: Tokenizer) -> Iterator[tuple[np.ndarray, int]]:
    """A document's tokens (int32) a piece at a time, so that no whole long document's tokens are held,
    then EOS when the tokenizer has one; each with the number of characters it covers."""
    for piece in pieces(doc):
        yield np.asarray(tokenizer.encode(piece), dtype=np.int32), len(piece)
    if tokenizer.eos_id is not None:
        yield np.array([tokenizer.eos_id], np.int32), 0


def process_shard() -> tuple[int, int]:
    """(this process's index, the number of processes)."""
    return jax.process_index(), jax.process_count()


def token_stream(docs: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
    """A split as one token stream, EOS after each document when the tokenizer has one."""
    return np.concatenate([ids for i in range(len(docs)) for ids, _ in encode_document(docs[i], tokenizer)])


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def write_token_file(docs: Sequence[str], tokenizer: Tokenizer, path: str | epath.PathLike,
                     provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tokenize `docs` one at a time into the flat file `path` (and its metadata `path`.json, written
    last: a file without it is incomplete). Returns the metadata."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _meta_path(path).unlink(missing_ok=True)  # the file is incomplete until its new metadata is written
    dtype, count, chars = _token_dtype(tokenizer.vocab_size), 0, 0
    partial = path.parent / f"{path.name}.partial-{uuid.uuid4().hex[:8]}"  # two writers never share one
    with partial.open("wb") as f:
        for i in range(len(docs)):
            for ids, n_chars in encode_document(docs[i], tokenizer):
                f.write(ids.astype(dtype).tobytes())
                count, chars = count + len(ids), chars + n_chars
    partial.replace(path)
    meta = {"tokens": count, "dtype": dtype.name, "documents": len(docs), "characters": chars, **(provenance or {})}
    _meta_path(path).write_text(json.dumps(meta, indent=1))
    return meta


def read_token_meta(path: str | epath.PathLike) -> dict[str, Any] | None:
    """The metadata of a complete token file, None when there is none."""
    meta = _meta_path(epath.Path(path))
    return json.loads(meta.read_text()) if meta.exists() else None


def _meta_path(path: epath.Path) -> epath.Path:
    return path.parent / (path.name + ".json")


class _RemoteTokens:
    """Token ranges of a file on a remote filesystem (gs://...), read on demand. Grain reads ahead
    from several threads: each seek-and-read holds the lock."""

    def __init__(self, path: str, count: int, dtype: np.dtype):
        self.path, self.count, self.dtype, self._file = path, count, dtype, None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, s: slice) -> np.ndarray:
        stop = min(s.stop, self.count)
        with self._lock:
            if self._file is None:
                self._file = epath.Path(self.path).open("rb")
            self._file.seek(s.start * self.dtype.itemsize)
            data = self._file.read((stop - s.start) * self.dtype.itemsize)
        return np.frombuffer(data, self.dtype)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def open_tokens(path: str | epath.PathLike) -> Any:
    """The token stream of a `write_token_file` file, as something sliceable: memory-mapped when local,
    read by range when remote."""
    meta = read_token_meta(path)
    if meta is None:
        raise FileNotFoundError(f"{path} is not a complete token file (no {path}.json).")
    dtype = np.dtype(meta["dtype"])
    if "://" in str(path):
        return _RemoteTokens(str(path), meta["tokens"], dtype)
    return np.memmap(str(path), dtype=dtype, mode="r", shape=(meta["tokens"],))


class TokenRows(Sequence):
    """Rows of seq_len + 1 tokens of a token stream, row i starting at token i * seq_len.

    The stream is an array, or the path of a `write_token_file` file, opened lazily (Grain worker
    processes receive the path, not the data)."""

    def __init__(self, tokens: np.ndarray | str | epath.PathLike, seq_len: int):
        self.seq_len = seq_len
        if isinstance(tokens, np.ndarray):
            self._path, self._tokens = None, tokens
        else:
            self._path, self._tokens = str(tokens), open_tokens(tokens)
        self.num_tokens = len(self._tokens)
        self._rows = (self.num_tokens - 1) // seq_len
        if self._rows < 1:
            raise ValueError(f"config.data.seq_len={seq_len} is longer than the training split "
                             f"({self.num_tokens} tokens); it needs at least seq_len + 1.")

    def _array(self) -> Any:
        if self._tokens is None:
            self._tokens = open_tokens(self._path)
        return self._tokens

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self._path is not None:
            state["_tokens"] = None
        return state

    def __len__(self) -> int:
        return self._rows

    def close(self) -> None:
        """Close the file behind the rows, if any (they reopen it when read again)."""
        if self._path is not None and self._tokens is not None:
            if isinstance(self._tokens, _RemoteTokens):
                self._tokens.close()
            self._tokens = None

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        start = i * self.seq_len
        return np.asarray(self._array()[start: start + self.seq_len + 1], dtype=np.int32)


def _as_example(row: np.ndarray | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A training example: a row of tokens, or an instruction row's tokens and response mask as they are."""
    return row if isinstance(row, dict) else {"tokens": row}


def train_dataset(rows: Sequence[np.ndarray], global_batch: int, seed: int, shard: tuple[int, int] | None = None,
                  start_step: int = 0) -> grain.IterDataset:
    """This process's slices of the global batches from step `start_step` on: dicts with `tokens`
    [global_batch / process count, seq_len + 1] int32."""
    index, count = shard or process_shard()
    if global_batch % count:
        raise ValueError(f"config.train.global_batch_size={global_batch} must be divisible by the number of "
                         f"processes ({count}).")
    ds = grain.MapDataset.source(rows).seed(seed).shuffle().repeat(None).map(_as_example)
    # Blocks of B/P rows; global batch s is blocks s*P .. s*P + P-1, and block s*P + p is process p's.
    ds = ds.batch(global_batch // count, drop_remainder=True)
    return ds[start_step * count + index: sys.maxsize: count].to_iter_dataset()


def train_iterator(rows: Sequence[np.ndarray], global_batch: int, seed: int, num_workers: int = 0,
                   shard: tuple[int, int] | None = None, start_step: int = 0) -> grain.DatasetIterator:
    ds = train_dataset(rows, global_batch, seed, shard, start_step)
    if num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(ds)


def eval_batches(tokens: Any, seq_len: int, batch_size: int, shard: tuple[int, int] | None = None,
                 max_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of one pass over a split's token stream (`token_stream`, or `open_tokens`
    of its file): `tokens` [batch_size, seq_len + 1] and `mask` [batch_size, seq_len] (1 for targets
    that count). Every process yields the same number of batches (all take part in each global
    batch), padding with fully masked rows. Instruction rows (`ExampleRows`) are batched in order."""
    if isinstance(tokens, ExampleRows):
        return example_batches(tokens, batch_size, shard or process_shard(), max_batches)
    return _token_batches(tokens, seq_len, batch_size, shard, max_batches)


def _token_batches(tokens: Any, seq_len: int, batch_size: int, shard: tuple[int, int] | None,
                   max_batches: int) -> Iterator[dict[str, np.ndarray]]:
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


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Every token id must have an embedding row: checked before training starts."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(f"The {tokenizer.kind} tokenizer has {tokenizer.vocab_size} tokens but the model's "
                         f"vocab_size is {model_vocab_size}; set --config.model.vocab_size={tokenizer.vocab_size} "
                         "(or larger).")


def count_tokens(docs: Sequence[str], tokenizer: Tokenizer) -> dict[str, Any]:
    """Documents, characters and tokens of a split (scripts/prepare_data.py prints them)."""
    counted = [(len(ids), n) for i in range(len(docs)) for ids, n in encode_document(docs[i], tokenizer)]
    tokens, chars = (sum(c) for c in zip(*counted, strict=True)) if counted else (0, 0)
    return {"documents": len(docs), "characters": chars, "tokens": tokens,
            "tokens_per_char": tokens / max(chars, 1)}
