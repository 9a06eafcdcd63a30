"""A run's tokenizer and split files, made once by process 0 (the only process that reads the data
source) before the first step, and reused by later invocations and by other runs where they are the
same: split files only when made from the same data settings, the same source bytes and the same
tokenizer (fingerprints in their metadata).

`write_split` is the one place that turns a source's split into a file: a token file (tokens.py) for
text sources, an examples file (examples.py) for instruction records. `PreparedSplits.rows` opens
either as rows (rows.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any

from etils import epath

from lightjax.data.examples import EXAMPLES_SUFFIX, write_examples
from lightjax.data.prompts import PromptStyle
from lightjax.data.records import is_instruction_source, load_records
from lightjax.data.rows import Rows, open_rows
from lightjax.data.sources import load_split, prepare_source, source_files
from lightjax.data.tokenizers import Tokenizer, load_tokenizer, make_tokenizer, tokenizer_fingerprint
from lightjax.data.tokens import read_meta, text_units, write_token_file
from lightjax.runtime.distributed import leader_value, run_once
from lightjax.runtime.files import content_fingerprint


def prepare_tokenizer(config: Any, workdir: epath.Path) -> Tokenizer:
    """The run's tokenizer: the one saved in WORKDIR/tokenizer/ when resuming, else built (once, by
    process 0, from the training split) and saved there; every process then loads the saved one."""
    saved = workdir / "tokenizer"

    def build() -> None:
        if not (saved / "tokenizer.json").exists():
            prepare_source(config.data)
            train_docs = load_split(config.data, "train") if config.data.tokenizer == "char" else None
            make_tokenizer(config.data.tokenizer, train_docs).save(saved)

    run_once("building the tokenizer", build)
    return load_tokenizer(saved)


def split_suffix(data: Any) -> str:
    """The file suffix of `config.data`'s prepared splits."""
    return EXAMPLES_SUFFIX if is_instruction_source(data.source) else ".tokens"


def write_split(data: Any, split: str, tokenizer: Tokenizer, path: str | epath.PathLike,
                provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tokenize `split` of `config.data`'s source into `path` (named with `split_suffix`); returns its
    metadata (its tokens, characters and bytes among them)."""
    if is_instruction_source(data.source):
        records = load_records(data.source, split, data.val_fraction)
        return write_examples(records, PromptStyle(data.prompt_style, data.tokenizer), tokenizer, path, provenance)
    return write_token_file(load_split(data, split), tokenizer, path, provenance)


@dataclasses.dataclass(frozen=True)
class PreparedSplits:
    """A run's prepared train and validation files, and what the trainer reads of them."""

    paths: dict[str, epath.Path]
    seq_len: int
    pack: bool
    document_mask: bool

    def rows(self, split: str, training: bool) -> Rows:
        return open_rows(self.paths[split], self.seq_len, training, self.pack, self.document_mask)

    def tokens_per_char(self, split: str) -> float:
        """Tokens per character of the split's text (for bits per character)."""
        return text_units(read_meta(self.paths[split]))["tokens_per_char"]


# The data keys a prepared split file depends on; any change prepares it again.
_SPLIT_FILE_KEYS = ("source", "tokenizer", "text_field", "val_split", "val_fraction", "prompt_style")
_FORMAT = 2  # split files with their documents' starts (token files made before had none)
_SPLITS = ("train", "validation")


def prepare_splits(config: Any, workdir: epath.Path, tokenizer: Tokenizer) -> PreparedSplits:
    """{train,validation}.tokens (instruction sources: .examples.npz) in config.data.tokens_dir
    (default WORKDIR/data): the splits tokenized, written by process 0 when missing. Files there are
    reused only when made from the same data settings, the same source bytes and the same tokenizer
    (fingerprints in their metadata); files made otherwise are left alone, and this run's are made in a
    subfolder named by its fingerprint. Only process 0 ever reads the data source; the others read these."""
    d = config.data
    directory = epath.Path(d.tokens_dir) if d.tokens_dir else workdir / "data"
    suffix = split_suffix(d)

    def prepare() -> int:
        prepare_source(d)
        provenance = {**{k: d[k] for k in _SPLIT_FILE_KEYS}, "format": _FORMAT,
                      "source_fingerprint": content_fingerprint(source_files(d)),
                      "tokenizer_fingerprint": tokenizer_fingerprint(workdir / "tokenizer")}
        key = hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()[:12]
        folder = _split_folder(directory, suffix, provenance, key)
        for split in _SPLITS:
            path = folder / f"{split}{suffix}"
            meta = read_meta(path)
            if meta is not None and _made_from(meta, provenance):
                continue
            start = time.perf_counter()
            meta = write_split(d, split, tokenizer, path, provenance)
            count = (meta["examples"], "examples") if "examples" in meta else (meta["tokens"], "tokens")
            print(f"Prepared {count[0]:,} {split} {count[1]} into {path} in {time.perf_counter() - start:.1f} s.",
                  flush=True)
        return 0 if folder == directory else int(key, 16)

    chosen = int(leader_value(run_once("preparing the data", prepare) or 0))
    folder = directory if chosen == 0 else directory / f"{chosen:012x}"
    return PreparedSplits({split: folder / f"{split}{suffix}" for split in _SPLITS}, d.seq_len, d.pack,
                          d.document_mask)


def _made_from(meta: dict[str, Any], provenance: dict[str, Any]) -> bool:
    return all(meta.get(k) == v for k, v in provenance.items())


def _split_folder(directory: epath.Path, suffix: str, provenance: dict[str, Any], key: str) -> epath.Path:
    """Where this run's split files are: `directory` unless it holds files made from other data or
    another tokenizer (never overwritten: another run may be reading them), else directory/KEY."""
    metas = [read_meta(directory / f"{split}{suffix}") for split in _SPLITS]
    if all(m is None or _made_from(m, provenance) for m in metas):
        return directory
    print(f"The token files in {directory} were made from other data or another tokenizer; this run's are in "
          f"{directory / key}.", flush=True)
    return directory / key
