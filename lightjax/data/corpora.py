"""Columnar corpora: Parquet files (`parquet:GLOB`) and Hugging Face datasets (`hf:NAME`, `hf:PATH`), each
a random-access sequence of documents that reads a block of rows at a time (a Parquet row group, a
thousand rows of an Arrow table), so that a corpus of any size is never held in memory and reading the
documents in order touches each block once.

Both are read through well-kept libraries: pyarrow reads Parquet's row groups and a single column of
them; `datasets` opens a folder written by `save_to_disk` or a dataset in the Hub's cache, memory-mapped.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class DocumentRange(Sequence):
    """Documents [start, stop) of a random-access corpus, itself sliceable (a split of the corpus, the
    documents one worker tokenizes). Pickles as the corpus and the range."""

    def __init__(self, corpus: Sequence, start: int, stop: int):
        self.corpus, self.start, self.stop = corpus, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int | slice) -> Any:  # type: ignore[override]
        if isinstance(i, slice):
            start, stop, _ = i.indices(len(self))
            return DocumentRange(self.corpus, self.start + start, self.start + max(stop, start))
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self.corpus[self.start + (i % len(self))]


def _text(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        kind = "empty (null)" if value is None else f"a {type(value).__name__}, not text"
        raise ValueError(f"{where}: {field!r} is {kind}.")
    return value


class ParquetCorpus(Sequence):
    """The `column` of each row of Parquet files, one document per row, in file and row order. Reads one
    row group's column at a time (never a whole file), keeping the last one read."""

    def __init__(self, files: list[Path], column: str):
        import pyarrow.parquet as pq

        self.files, self.column = files, column
        groups = []  # (file index, row group, rows, the group's first row in its file)
        for i, path in enumerate(files):
            try:
                meta = pq.ParquetFile(path)
            except Exception as e:  # noqa: BLE001 (pyarrow's errors have no common base; named in one line)
                raise ValueError(f"{path} is not a Parquet file ({e}).") from None
            if column not in meta.schema_arrow.names:
                raise ValueError(f"{path} has no column {column!r} (columns: {', '.join(meta.schema_arrow.names)}); "
                                 "set config.data.text_field.")
            rows = [meta.metadata.row_group(g).num_rows for g in range(meta.num_row_groups)]
            firsts = np.cumsum([0, *rows[:-1]])
            groups += [(i, g, n, first) for g, (n, first) in enumerate(zip(rows, firsts, strict=True))]
        self._groups = np.asarray(groups, np.int64).reshape(-1, 4)
        self._firsts = np.concatenate([[0], np.cumsum(self._groups[:, 2])])
        self._cache: tuple[int, list[Any]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}

    def __len__(self) -> int:
        return int(self._firsts[-1])

    def __getitem__(self, i: int | slice) -> Any:  # type: ignore[override]
        if isinstance(i, slice):
            return DocumentRange(self, 0, len(self))[i]
        group = int(np.searchsorted(self._firsts, i, side="right")) - 1
        file_index, row_group, _, first = (int(x) for x in self._groups[group])
        if self._cache is None or self._cache[0] != group:
            import pyarrow.parquet as pq

            table = pq.ParquetFile(self.files[file_index]).read_row_group(row_group, columns=[self.column])
            self._cache = (group, table.column(0).to_pylist())
        row = i - int(self._firsts[group])
        value = self._cache[1][row]
        return value if isinstance(value, str) else _text(value, f"{self.files[file_index]} row {first + row}",
                                                          self.column)


def parquet_files(pattern: str) -> list[Path]:
    files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not files:
        raise FileNotFoundError(f"config.data.source='parquet:{pattern}' matches no file.")
    return files


class HFCorpus(Sequence):
    """The `field` of each row of a Hugging Face `datasets.Dataset` (Arrow, memory-mapped), read a block of
    rows at a time."""

    _BLOCK = 1024

    def __init__(self, dataset: Any, field: str, name: str):
        if field not in dataset.column_names:
            raise ValueError(f"{name} has no column {field!r} (columns: {', '.join(dataset.column_names)}); set "
                             "config.data.text_field.")
        self.dataset, self.field, self.name = dataset, field, name
        self._cache: tuple[int, list[Any]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int | slice) -> Any:  # type: ignore[override]
        if isinstance(i, slice):
            return DocumentRange(self, 0, len(self))[i]
        block = i // self._BLOCK
        if self._cache is None or self._cache[0] != block:
            start = block * self._BLOCK
            self._cache = (block, self.dataset[start: start + self._BLOCK][self.field])
        value = self._cache[1][i % self._BLOCK]
        return value if isinstance(value, str) else _text(value, f"{self.name} row {i}", self.field)

    def files(self) -> list[str]:
        return [f["filename"] for f in self.dataset.cache_files]


class StreamedCorpus:
    """The `field` of each row of a streamed Hugging Face dataset (`datasets.IterableDataset`: read as it
    arrives, never downloaded whole), cut by its files: `stream_chunks()` gives one iterable of documents
    per file, in order, each read by whichever process or worker tokenizes it."""

    def __init__(self, dataset: Any, field: str, name: str, files: range):
        self.dataset, self.field, self.name, self.files = dataset, field, name, files

    def stream_chunks(self) -> list[_StreamedFile]:
        return [_StreamedFile(self, i) for i in self.files]


class _StreamedFile:
    """The documents of file `index` of a streamed dataset (picklable: a worker process reads it)."""

    def __init__(self, corpus: StreamedCorpus, index: int):
        self.corpus, self.index = corpus, index

    def __iter__(self) -> Any:
        c = self.corpus
        for row, record in enumerate(c.dataset.shard(num_shards=c.dataset.num_shards, index=self.index)):
            value = record.get(c.field)
            if not isinstance(value, str):
                where = f"{c.name} file {self.index} row {row}"
                if c.field not in record:
                    raise ValueError(f"{where} has no column {c.field!r} (columns: {', '.join(record)}); set "
                                     "config.data.text_field.")
                _text(value, where, c.field)
            yield value


def streamed_splits(dataset: Any, field: str, spec: str, val_split: str, val_fraction: float) -> dict[str, Any]:
    """A streamed dataset's train and validation corpora: its own validation split, else its last files
    (as many as val_fraction of them, at least one)."""
    val = dataset.get(val_split) if hasattr(dataset, "keys") else None
    train = dataset.get("train") if hasattr(dataset, "keys") else dataset
    if train is None:
        raise ValueError(f"config.data.source={spec!r} has no 'train' split (its splits: {', '.join(dataset)}).")
    if val is not None:
        return {"train": StreamedCorpus(train, field, f"{spec}[train]", range(train.num_shards)),
                "validation": StreamedCorpus(val, field, f"{spec}[{val_split}]", range(val.num_shards))}
    files = train.num_shards
    if files < 2:
        raise ValueError(f"config.data.source={spec!r} streams one file and has no {val_split!r} split: nothing to "
                         "hold out for validation (data.val_fraction holds out whole files of a stream).")
    held = min(max(1, round(files * val_fraction)), files - 1)
    return {"train": StreamedCorpus(train, field, f"{spec}[train]", range(files - held)),
            "validation": StreamedCorpus(train, field, f"{spec}[train]", range(files - held, files))}


def load_hf_dataset(spec: str, streaming: bool = False) -> Any:
    """`hf:PATH` (a folder written by `save_to_disk`, or of data files such as a Hub repository's download)
    or `hf:NAME` / `hf:NAME:CONFIG` (from the Hub, or its local cache when offline): a `datasets.Dataset`
    or `DatasetDict`; with `streaming`, read as it arrives (`IterableDataset`), not downloaded first."""
    import datasets

    name = spec[len("hf:"):]
    folder = Path(name)
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        if streaming:
            raise ValueError(f"config.data.source={spec!r} is a saved dataset (save_to_disk), read memory-mapped; "
                             "data.hf_streaming is for datasets of data files.")
        return datasets.load_from_disk(name)
    repo, _, subset = (name, "", "") if folder.is_dir() else name.partition(":")
    try:
        return datasets.load_dataset(repo, subset or None, streaming=streaming)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"config.data.source={spec!r}: no such folder, and the Hub has no such dataset "
                                f"({e}).") from None
    except (ConnectionError, OSError) as e:
        raise OSError(f"config.data.source={spec!r}: not a local folder, and the Hub could not be reached ({e}); "
                      "save the dataset with save_to_disk and name its folder.") from None


def hf_split(dataset: Any, split: str, val_split: str, spec: str) -> Any | None:
    """The `split` ('train', 'validation', 'test') of a loaded dataset, None where it has none of that name
    (then the validation split is cut from train by data.val_fraction)."""
    if not hasattr(dataset, "keys"):  # one Dataset: its documents are the train split
        return dataset if split == "train" else None
    name = val_split if split == "validation" else split
    if split == "train" and "train" not in dataset:
        raise ValueError(f"config.data.source={spec!r} has no 'train' split (its splits: {', '.join(dataset)}).")
    return dataset.get(name)
