"""Token files: a split of a text source tokenized once into one flat stream on disk.

    documents --tokenize a piece at a time, EOS after each document (when the tokenizer has one)-->
      WORKDIR/data/SPLIT.tokens (uint16 or uint32), SPLIT.tokens.starts (each document's first token,
      int64: where attention stops when rows are document-masked) + SPLIT.tokens.json (its length, dtype,
      the documents, characters and bytes it covers, and its provenance), the metadata written last

A split of a large corpus is written in chunks by every process instead (chunks.py): its token stream is
then SPLIT.tokens.d/NNNNN.tokens, joined by the metadata's list of their token counts, and read as one.

A file without its metadata is incomplete. Local files are memory-mapped when read; files on an object
store (gs://) are read by range. Instruction examples (examples.py) are kept the same way, with the
same metadata file beside them.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from etils import epath

from lightjax.data.text import TextFile, pieces
from lightjax.data.tokenizers import Tokenizer
from lightjax.runtime.files import atomic_path, write_atomic


def encode_document(doc: str | TextFile, tokenizer: Tokenizer) -> Iterator[tuple[np.ndarray, str]]:
    """A document's tokens (int32) a piece at a time, so that no whole long document's tokens are held,
    each with the text it covers; then EOS (covering no text) when the tokenizer has one."""
    for piece in pieces(doc):
        yield np.asarray(tokenizer.encode(piece), dtype=np.int32), piece
    if tokenizer.eos_id is not None:
        yield np.array([tokenizer.eos_id], np.int32), ""


def token_stream(docs: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
    """A split as one token stream in memory, EOS after each document when the tokenizer has one."""
    return np.concatenate([ids for i in range(len(docs)) for ids, _ in encode_document(docs[i], tokenizer)])


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def write_token_file(docs: Iterable[str | TextFile], tokenizer: Tokenizer, path: str | epath.PathLike,
                     provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tokenize `docs` (a sequence, or a stream read once) one at a time into the flat file `path` and its
    metadata (`write_meta`, last). Returns the metadata."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta_path(path).unlink(missing_ok=True)  # the file is incomplete until its new metadata is written
    dtype, count, chars, nbytes = _token_dtype(tokenizer.vocab_size), 0, 0, 0
    starts = []
    ordered = (docs[i] for i in range(len(docs))) if isinstance(docs, Sequence) else docs
    with atomic_path(path) as partial, partial.open("wb") as f:
        for doc in ordered:
            starts.append(count)
            for ids, text in encode_document(doc, tokenizer):
                f.write(ids.astype(dtype).tobytes())
                count, chars, nbytes = count + len(ids), chars + len(text), nbytes + len(text.encode("utf-8"))
    with atomic_path(starts_path(path)) as partial, partial.open("wb") as f:
        f.write(np.asarray(starts, np.int64).tobytes())
    meta = {"tokens": count, "dtype": dtype.name, "documents": len(starts), "characters": chars, "bytes": nbytes,
            **(provenance or {})}
    write_meta(path, meta)
    return meta


def starts_path(path: epath.Path) -> epath.Path:
    """Where a token file's document starts are: `path`.starts, one int64 token offset per document."""
    return path.parent / (path.name + ".starts")


def open_document_starts(path: str | epath.PathLike) -> np.ndarray:
    """The token offset at which each document of a token file starts (memory-mapped when local)."""
    path = epath.Path(path)
    if "://" in str(path):
        return np.frombuffer(starts_path(path).read_bytes(), np.int64)
    return np.memmap(str(starts_path(path)), dtype=np.int64, mode="r")


def chunk_path(path: epath.Path, chunk: int) -> epath.Path:
    """Where chunk `chunk` of the split file `path` is (chunks.py): `path`.d/NNNNN.tokens."""
    return path.parent / (path.name + ".d") / f"{chunk:05d}.tokens"


def meta_path(path: epath.Path) -> epath.Path:
    """Where the metadata of the split file `path` is: `path`.json."""
    return path.parent / (path.name + ".json")


def write_meta(path: str | epath.PathLike, meta: dict[str, Any]) -> None:
    """The metadata of a split file, written once the file is complete."""
    write_atomic(meta_path(epath.Path(path)), json.dumps(meta, indent=1))


def read_meta(path: str | epath.PathLike) -> dict[str, Any] | None:
    """The metadata of a complete split file (token file or examples), None when there is none."""
    meta = meta_path(epath.Path(path))
    return json.loads(meta.read_text()) if meta.exists() else None


def text_units(meta: dict[str, Any]) -> dict[str, float]:
    """Tokens per character and per UTF-8 byte of a split file (token file or examples) from its metadata,
    to turn nats per token into bits per character or byte."""
    return {"tokens_per_char": meta["tokens"] / max(meta["characters"], 1),
            "tokens_per_byte": meta["tokens"] / max(meta["bytes"], 1)}


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


class _ChunkedTokens:
    """The token stream of a split written in chunks: ranges read across its chunk files, each opened
    (memory-mapped, or read by range when remote) when first read."""

    def __init__(self, path: epath.Path, counts: list[int]):
        self.path, self.offsets = path, np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._chunks: dict[int, Any] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _chunk(self, c: int) -> Any:
        if c not in self._chunks:
            self._chunks[c] = _open_stream(chunk_path(self.path, c))
        return self._chunks[c]

    def __getitem__(self, s: slice) -> np.ndarray:
        start, stop = s.start, min(s.stop, len(self))
        c, parts = int(np.searchsorted(self.offsets, start, side="right")) - 1, []
        while start < stop:
            low, high = start - self.offsets[c], min(stop, self.offsets[c + 1]) - self.offsets[c]
            if high > low:
                parts.append(np.asarray(self._chunk(c)[int(low):int(high)]))
            start, c = self.offsets[c] + high, c + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def close(self) -> None:
        for chunk in self._chunks.values():
            if hasattr(chunk, "close"):
                chunk.close()
        self._chunks = {}


def _open_stream(path: epath.Path) -> Any:
    meta = read_meta(path)
    if meta is None:
        raise FileNotFoundError(f"{path} is not a complete token file (no {path}.json).")
    if "chunks" in meta:
        return _ChunkedTokens(path, meta["chunks"])
    dtype = np.dtype(meta["dtype"])
    if "://" in str(path):
        return _RemoteTokens(str(path), meta["tokens"], dtype)
    return np.memmap(str(path), dtype=dtype, mode="r", shape=(meta["tokens"],))


def open_tokens(path: str | epath.PathLike) -> Any:
    """The token stream of a token file (`write_token_file`, or chunks joined by `chunks.join_chunks`), as
    something sliceable: memory-mapped when local, read by range when remote."""
    return _open_stream(epath.Path(path))


def count_tokens(docs: Sequence[str], tokenizer: Tokenizer) -> dict[str, Any]:
    """Documents, characters and tokens of a split (scripts/prepare_data.py prints them)."""
    tokens = chars = 0
    for i in range(len(docs)):
        for ids, text in encode_document(docs[i], tokenizer):
            tokens, chars = tokens + len(ids), chars + len(text)
    return {"documents": len(docs), "characters": chars, "tokens": tokens, "tokens_per_char": tokens / max(chars, 1)}
