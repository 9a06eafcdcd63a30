"""Sources of documents: each gives, per split, a random-access sequence of documents: `str`, or for
a `.txt` file a `TextFile`, read a piece at a time (`pieces(doc)` gives any document's text so).

- `tiny_shakespeare`: our own TFDS builder (ArrayRecord, no TensorFlow) with TFDS's URL, checksum and
  90/5/5 character split; it downloads once, or reads `config.data.local_path` (offline machines).
- `tfds:NAME`: any TFDS dataset prepared in ArrayRecord format, read with `tfds.data_source`.
- `text:GLOB`: local `.txt` files (one document each) or `.jsonl` files, plain, `.jsonl.gz` or `.jsonl.zst`
  (a `text` field per line).
- `parquet:GLOB`: Parquet files, a `text` column (corpora.py).
- `hf:PATH`, `hf:NAME[:CONFIG]`: a Hugging Face dataset saved with `save_to_disk`, or from the Hub (or its
  cache), a `text` column (corpora.py).
- `json:PATH`, `jsonl:PATH`: instruction records for fine-tuning (records.py, prompts.py); as documents,
  each record's prompt and response as one text.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging as absl_logging
from etils import epath

from lightjax.data import tiny_shakespeare
from lightjax.data.corpora import (
    DocumentRange,
    HFCorpus,
    ParquetCorpus,
    hf_split,
    load_hf_dataset,
    parquet_files,
    streamed_splits,
)
from lightjax.data.prompts import PromptStyle
from lightjax.data.records import is_instruction_source, load_records
from lightjax.data.text import TextFile

SOURCES = ("tiny_shakespeare", "tfds:NAME", "text:GLOB", "parquet:GLOB", "hf:PATH", "hf:NAME", "json:PATH",
           "jsonl:PATH")
SPLITS = ("train", "validation", "test")  # text: sources have no test split


def is_known_source(spec: str) -> bool:
    """Whether `config.data.source` names a kind of source lightjax reads (SOURCES)."""
    return spec == "tiny_shakespeare" or spec.startswith(("tfds:", "text:", "parquet:", "hf:", "json:",
                                                                         "jsonl:"))


class TextField(Sequence):
    """Documents of a TFDS data source: the `field` of each record, decoded from UTF-8.
    Picklable (Grain workers receive it), random access, decoded lazily."""

    def __init__(self, source: Any, field: str, name: str):
        self.source, self.field, self.name = source, field, name

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int | slice) -> Any:  # type: ignore[override]
        if isinstance(index, slice):
            return DocumentRange(self, 0, len(self))[index]
        record = self.source[index]
        if self.field not in record:
            raise KeyError(f"{self.name}: record {index} has no field {self.field!r} (fields: {sorted(record)}); "
                           "set config.data.text_field.")
        value = record[self.field]
        try:
            return value.decode("utf-8") if isinstance(value, bytes) else str(value)
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.name}: record {index} is not valid UTF-8 at byte offset {e.start}.") from None


def _tiny_shakespeare_builder():
    class TinyShakespeare(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """TFDS's tiny_shakespeare without TensorFlow: one document per split, split by characters."""

        name = "lightjax_tiny_shakespeare"
        VERSION = tfds.core.Version("1.0.0")

        def __init__(self, *, local_path: str = "", **kwargs: Any):
            self._local_path = local_path
            super().__init__(**kwargs)

        def _info(self) -> tfds.core.DatasetInfo:
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
                homepage="https://github.com/karpathy/char-rnn", disable_shuffling=True)

        def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
            path = self._local_path or dl_manager.download(tiny_shakespeare.URL)
            parts = tiny_shakespeare.split(tiny_shakespeare.read_verified(path))
            return {name: self._generate_examples(text) for name, text in parts.items()}

        def _generate_examples(self, text: str):
            yield 0, {"text": text}

    return TinyShakespeare


class TextCorpus(Sequence):
    """The documents of `text:` files, read when asked for, so that a corpus of any size is never held
    in memory: a `.txt` file is one document, each non-blank line of a `.jsonl` file one (its lines are
    located by byte offset once, when the corpus is opened)."""

    def __init__(self, files: list[Path], text_field: str, _index: np.ndarray | None = None):
        self.files, self.text_field = files, text_field
        self._index = self._locate(files) if _index is None else _index  # rows: file, offset, length, line
        self._open: list[Any] | None = None  # [file index, open file, position]: the .jsonl file read last

    @staticmethod
    def _locate(files: list[Path]) -> np.ndarray:
        rows = []
        for i, f in enumerate(files):
            if not is_jsonl(f):
                rows.append((i, 0, -1, 0))
                continue
            offset = 0
            with open_jsonl(f) as lines:
                for line_no, line in enumerate(lines, 1):
                    if line.strip():
                        rows.append((i, offset, len(line), line_no))
                    offset += len(line)
        return np.asarray(rows, dtype=np.int64).reshape(-1, 4)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": None}

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int | slice) -> Any:  # type: ignore[override]
        if isinstance(i, slice):
            return TextCorpus(self.files, self.text_field, self._index[i])
        file_index, offset, length, line_no = (int(x) for x in self._index[i])
        path = self.files[file_index]
        if length < 0:
            return TextFile(path)
        raw = self._read(file_index, offset, length)
        try:
            record = json.loads(raw)
        except ValueError:
            raise ValueError(f"{path}:{line_no} is not valid JSON.") from None
        if not isinstance(record, dict) or self.text_field not in record:
            raise ValueError(f"{path}:{line_no} has no field {self.text_field!r}; set config.data.text_field.")
        text = record[self.text_field]
        if not isinstance(text, str):
            raise ValueError(f"{path}:{line_no}: field {self.text_field!r} is a {type(text).__name__}, not text.")
        return text


    def _read(self, file_index: int, offset: int, length: int) -> bytes:
        """Bytes [offset, offset + length) of a .jsonl file, decompressed. The file stays open between
        reads: a compressed stream only goes forward (by decompressing), and is reopened to go back."""
        if self._open is None or self._open[0] != file_index or self._open[2] > offset:
            if self._open is not None:
                self._open[1].close()
            self._open = [file_index, open_jsonl(self.files[file_index]), 0]
        f, position = self._open[1], self._open[2]
        if f.seekable():
            f.seek(offset)
        else:
            while position < offset and (skipped := len(f.read(min(offset - position, 1 << 20)))):
                position += skipped
        data = f.read(length)
        self._open[2] = offset + len(data)
        return data


JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")


def is_jsonl(path: Path) -> bool:
    return path.name.endswith(JSONL_SUFFIXES)


def open_jsonl(path: Path) -> Any:
    """A .jsonl file's bytes, decompressed from .jsonl.gz (gzip) or .jsonl.zst (zstandard, streamed)."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.open(path, "rb"))  # lines: the bare stream has no readline
    return path.open("rb")


def _text_documents(pattern: str, text_field: str) -> TextCorpus:
    return TextCorpus(_text_files(pattern), text_field)


def _text_files(pattern: str) -> list[Path]:
    files = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
    if not files:
        raise FileNotFoundError(f"config.data.source='text:{pattern}' matches no file.")
    folders = [str(f) for f in files if f.is_dir()]
    if folders:
        raise ValueError(f"config.data.source='text:{pattern}' matches folders ({', '.join(folders[:3])}); name "
                         "files, e.g. text:corpus/**/*.txt.")
    if not any(f.stat().st_size for f in files):
        raise ValueError(f"config.data.source='text:{pattern}': the corpus is empty ({len(files)} files, no text).")
    return files


def split_documents(docs: Sequence[str], val_fraction: float) -> dict[str, Sequence[str]]:
    """Deterministic train/validation split: the last `val_fraction` of the documents; a single
    document is split by characters instead (its last `val_fraction`)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"config.data.val_fraction={val_fraction} must be in (0, 1).")
    if len(docs) == 1:
        doc = docs[0]
        cut = int(len(doc) * (1 - val_fraction))
        return {"train": [doc[:cut]], "validation": [doc[cut:]]}
    n_val = max(1, round(len(docs) * val_fraction))
    return {"train": docs[:-n_val], "validation": docs[-n_val:]}


def _tiny_shakespeare(data: Any, local_path: str = "") -> Any:
    return _tiny_shakespeare_builder()(local_path=local_path or data.local_path, data_dir=data.data_dir or None,
                                       file_format="array_record")


def prepare_source(data: Any) -> None:
    """Download and prepare `config.data.source` where it needs it (tiny_shakespeare, once per data_dir).
    In a multi-process job only one process may do this (distributed.run_once): processes preparing
    one data_dir together race on its folders."""
    if data.source == "tiny_shakespeare":
        with _quiet_tfds():
            builder = _tiny_shakespeare(data)
            prepared = builder.is_prepared()
        if not prepared:
            if not data.local_path:  # fetched here, once, failing fast offline (TFDS's downloader retries for minutes)
                text = tiny_shakespeare.download(data.download_url, Path(builder.data_dir).parent / "input.txt")
                builder = _tiny_shakespeare(data, str(text))
            tfds.disable_progress_bar()  # a one-off preparation of 1 MB; its bars only clutter the log
            with _quiet_tfds():
                builder.download_and_prepare()
            print(f"Prepared Tiny Shakespeare (TFDS, ArrayRecord) in {builder.data_dir}.", flush=True)


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    """TFDS's own account of preparing our builder: a warning that a fresh data_dir holds no dataset yet,
    and 'Downloading and preparing dataset Unknown size ...' lines (its sizes are unknown to a generator
    builder); one line of ours says what was prepared instead."""
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        absl_logging.set_verbosity(verbosity)


def source_files(data: Any) -> list[epath.Path]:
    """The files `config.data.source` is read from, for the fingerprint that decides whether token files
    made earlier are still this data's. Tiny Shakespeare has none: its text is checked against its
    sha256 when read, so it is always the same."""
    source = data.source
    if source.startswith("text:"):
        return [epath.Path(f) for f in _text_files(source[len("text:"):])]
    if is_instruction_source(source):
        path = epath.Path(source.split(":", 1)[1])
        kind = source.split(":", 1)[0]
        return [path / f"{split}.{kind}" for split in ("train", "validation")] if path.is_dir() else [path]
    if source.startswith("parquet:"):
        return [epath.Path(f) for f in parquet_files(source[len("parquet:"):])]
    if source.startswith("hf:"):  # a stream has no local files: its name (in the provenance) stands for it
        return [] if data.hf_streaming else [epath.Path(f) for f in _hf_corpus(data, "train").files()]
    if source.startswith("tfds:"):
        name = source[len("tfds:"):].split(":")[0]
        root = epath.Path(data.data_dir or tfds.core.constants.DATA_DIR) / name.split("/")[0]
        return [p for p in root.glob("**/*") if p.is_file()]
    return []


def _hf_corpus(data: Any, split: str) -> Sequence[str]:
    """A split of an `hf:` dataset: its own where it has a validation split, else train's documents split by
    val_fraction."""
    dataset = load_hf_dataset(data.source, data.hf_streaming)
    if data.hf_streaming:
        if split == "test":
            raise ValueError(f"config.data.source={data.source!r}: a stream is read for training and validation only.")
        return streamed_splits(dataset, data.text_field, data.source, data.val_split, data.val_fraction)[split]
    if split == "test" or hf_split(dataset, "validation", data.val_split, data.source) is not None:
        own = hf_split(dataset, split, data.val_split, data.source)
        if own is None:
            raise ValueError(f"config.data.source={data.source!r} has no {split!r} split (its splits: "
                             f"{', '.join(dataset) if hasattr(dataset, 'keys') else 'train'}).")
        return HFCorpus(own, data.text_field, f"{data.source}[{split}]")
    train = HFCorpus(hf_split(dataset, "train", data.val_split, data.source), data.text_field, f"{data.source}[train]")
    return split_documents(train, data.val_fraction)[split]


def source_splits(data: Any) -> tuple[str, ...]:
    """The splits `config.data.source` has: Tiny Shakespeare and TFDS datasets a test split too, text and
    instruction sources only what they are cut into (train and validation)."""
    return SPLITS if data.source == "tiny_shakespeare" or data.source.startswith(("tfds:", "hf:")) else SPLITS[:2]


def load_split(data: Any, split: str) -> Sequence[str]:
    """The documents of `split` ('train', 'validation', or 'test' where the source has one) of `config.data`."""
    source = data.source
    if split not in source_splits(data):
        raise ValueError(f"config.data.source={source!r} has no {split!r} split (its splits: "
                         f"{', '.join(source_splits(data))}).")
    if source == "tiny_shakespeare":
        prepare_source(data)
        return TextField(_tiny_shakespeare(data).as_data_source(split), "text", "tiny_shakespeare")
    if source.startswith("tfds:"):
        name = source[len("tfds:"):]
        tfds_split = data.val_split if split == "validation" else split
        src = tfds.data_source(name, split=tfds_split, data_dir=data.data_dir or None, download=False)
        return TextField(src, data.text_field, f"tfds:{name}[{tfds_split}]")
    if source.startswith("text:"):
        return split_documents(_text_documents(source[len("text:"):], data.text_field), data.val_fraction)[split]
    if source.startswith("parquet:"):
        corpus = ParquetCorpus(parquet_files(source[len("parquet:"):]), data.text_field)
        return split_documents(corpus, data.val_fraction)[split]
    if source.startswith("hf:"):
        return _hf_corpus(data, split)
    if is_instruction_source(source):
        style = PromptStyle(data.prompt_style, data.tokenizer)
        return ["".join(style(record)) for record in load_records(source, split, data.val_fraction)]
    raise ValueError(f"config.data.source={source!r} is not one of {', '.join(SOURCES)}.")
