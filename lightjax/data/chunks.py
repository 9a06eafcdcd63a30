"""A split's token file written in chunks, by every process and every core, and joined by one index.

    documents 0..N-1 --cut into at most TARGET_CHUNKS ranges of consecutive documents (by N alone)-->
      chunk c --tokenized by process c mod P (in it, by one of its worker processes)-->
        SPLIT.tokens.d/NNNNN.tokens (+ .starts, + .json written last: the chunk is complete)
      --process 0, once every chunk is complete-->
        SPLIT.tokens.starts (every document's first token) + SPLIT.tokens.json (the chunks' token counts)

The chunks are cut by the document count alone and tokenized document by document as one writer would,
so the joined stream is the same token for token whatever the number of processes and workers that
wrote it: the rows, and so the global batches, are those of a single writer. A chunk whose metadata
exists was finished (from the same data and tokenizer, its provenance says), so a preparation that was
stopped resumes from its finished chunks. A worker holds one document piece's tokens at a time.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any

import numpy as np
from etils import epath

from lightjax.data.tokenizers import Tokenizer, load_tokenizer
from lightjax.data.tokens import chunk_path, read_meta, starts_path, write_meta, write_token_file
from lightjax.runtime.files import atomic_path

# Enough chunks to keep 2 x 128 cores busy; few enough that each is a sizeable sequential write.
TARGET_CHUNKS = 256


def chunk_ranges(num_documents: int) -> list[tuple[int, int]]:
    """Document ranges [start, stop) of the chunks of a split of `num_documents` documents."""
    size = max(1, -(-num_documents // TARGET_CHUNKS))
    return [(a, min(a + size, num_documents)) for a in range(0, num_documents, size)]


def split_chunks(docs: Any) -> list[tuple[Any, int | None]]:
    """A split's chunks: (their documents, the first one's index). A random-access split is cut by
    `chunk_ranges`; a streamed one (`stream_chunks()`: its files, in order) gives its own, of unknown
    length until read (index None)."""
    if hasattr(docs, "stream_chunks"):
        return [(chunk, None) for chunk in docs.stream_chunks()]
    return [(docs[a:b], a) for a, b in chunk_ranges(len(docs))]


def _chunk_done(path: epath.Path, documents: Any, first: int | None, provenance: dict[str, Any]) -> bool:
    meta = read_meta(path)
    return meta is not None and meta.get("first_document") == first and all(
        meta.get(k) == v for k, v in provenance.items()) and (first is None or meta.get("documents") == len(documents))


_WORKER_TOKENIZERS: dict[str, Tokenizer] = {}  # in a worker process: the tokenizer, loaded once


def _write_chunk(docs: Sequence[Any], tokenizer_dir: str, path: str, provenance: dict[str, Any]) -> dict[str, Any]:
    """One chunk (a worker's task): its documents tokenized into the token file `path`."""
    if tokenizer_dir not in _WORKER_TOKENIZERS:
        _WORKER_TOKENIZERS[tokenizer_dir] = load_tokenizer(tokenizer_dir)
    return write_token_file(docs, _WORKER_TOKENIZERS[tokenizer_dir], path, provenance)


def _warm_up() -> None:
    """A worker's first task: the modules that its chunks' documents unpickle into, imported while the
    parent process is still reading the source."""
    import lightjax.data.corpora  # noqa: F401
    import lightjax.data.sources  # noqa: F401


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[futures.ProcessPoolExecutor | None]:
    """`workers` worker processes for `write_chunks`, started at once (None for one: chunks are then
    tokenized in this process). One pool serves every split, so that they start once."""
    if workers <= 1:
        yield None
        return
    # Fresh interpreters: a forked copy of a process that has started JAX's or the tokenizer's threads can hang.
    with futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for _ in range(workers):
            pool.submit(_warm_up)
        yield pool


def write_chunks(docs: Sequence[Any], tokenizer_dir: str | epath.PathLike, path: str | epath.PathLike,
                 provenance: dict[str, Any], shard: tuple[int, int] = (0, 1),
                 pool: futures.ProcessPoolExecutor | None = None,
                 on_chunk: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Tokenize this process's chunks of `docs` (chunk c is process c mod P's, `shard` = (p, P)) that are
    not finished yet, in `pool`'s worker processes (`worker_pool`; None: here), with the tokenizer saved in
    `tokenizer_dir`. `on_chunk(meta)` is called as each is finished. Returns the new chunks' metadata."""
    path, index, count = epath.Path(path), *shard
    chunks = split_chunks(docs)
    todo = [c for c in range(index, len(chunks), count)
            if not _chunk_done(chunk_path(path, c), *chunks[c], {**provenance, "chunk": c})]
    tasks = [(chunks[c][0], str(tokenizer_dir), str(chunk_path(path, c)),
              {**provenance, "chunk": c, "first_document": chunks[c][1]}) for c in todo]
    results = (futures.as_completed([pool.submit(_write_chunk, *task) for task in tasks]) if pool is not None
               else (_write_chunk(*task) for task in tasks))
    done = []
    for result in results:
        done.append(result if pool is None else result.result())
        if on_chunk:
            on_chunk(done[-1])
    return done


def join_chunks(path: str | epath.PathLike, num_chunks: int, provenance: dict[str, Any]) -> dict[str, Any]:
    """Once every chunk of the split file `path` is finished: its documents' starts and its metadata (the
    chunks' token counts: the index that joins them), written last. Returns the metadata."""
    path = epath.Path(path)
    metas = [read_meta(chunk_path(path, c)) for c in range(num_chunks)]
    missing = [c for c, m in enumerate(metas) if m is None]
    if missing:
        raise RuntimeError(f"{path}: chunks {missing[:5]} are not finished; every process must prepare its share.")
    counts = np.array([m["tokens"] for m in metas], np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    with atomic_path(starts_path(path)) as partial, partial.open("wb") as f:
        for c, offset in enumerate(offsets):
            starts = np.frombuffer(starts_path(chunk_path(path, c)).read_bytes(), np.int64)
            f.write((starts + offset).tobytes())
    meta = {"tokens": int(counts.sum()), "dtype": metas[0]["dtype"] if metas else "uint16",
            **{k: sum(m[k] for m in metas) for k in ("documents", "characters", "bytes")},
            **provenance, "chunks": counts.tolist()}
    write_meta(path, meta)
    for leftover in chunk_path(path, 0).parent.glob(".*.partial-*"):  # of writers that were killed
        leftover.unlink(missing_ok=True)
    return meta


class Progress:
    """What a preparation has done, as a tqdm bar: documents, MB/s of text, tokens/s and the time left."""

    def __init__(self, total_documents: int | None, name: str, enabled: bool = True):
        from tqdm import tqdm

        self.bar = tqdm(total=total_documents, unit="doc", desc=name, disable=not enabled, smoothing=0.1)
        self.start, self.bytes, self.tokens = time.perf_counter(), 0, 0

    def __call__(self, meta: dict[str, Any]) -> None:
        self.bytes, self.tokens = self.bytes + meta["bytes"], self.tokens + meta["tokens"]
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.bytes / elapsed / 1e6:.2f} MB/s, {self.tokens / elapsed:,.0f} tok/s",
                                 refresh=False)
        self.bar.update(meta["documents"])

    def close(self) -> None:
        self.bar.close()


def split_done(path: str | epath.PathLike, provenance: dict[str, Any]) -> bool:
    """Whether the split file `path` is complete and made from `provenance`."""
    meta = read_meta(path)
    return meta is not None and all(meta.get(k) == v for k, v in provenance.items())

