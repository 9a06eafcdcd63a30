"""A run's tokenizer and split files, made once before the first step, and reused by later invocations
and by other runs where they are the same: split files only when made from the same data settings, the
same source bytes and the same tokenizer (fingerprints in their metadata).

Text sources are tokenized by every process, each its share of the chunks, on all of its cores (chunks.py);
instruction records (small, and rendered with a prompt style) by process 0 into an examples file
(examples.py). `PreparedSplits.rows` opens either as rows (rows.py).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import time
from typing import Any

import numpy as np
from etils import epath

from lightjax.data.chunks import Progress, join_chunks, split_chunks, worker_pool, write_chunks
from lightjax.data.examples import EXAMPLES_SUFFIX, write_examples
from lightjax.data.mixture import MixedRows, Mixture
from lightjax.data.pipeline import process_shard
from lightjax.data.preferences import PAIRS_SUFFIX, is_preference_source, write_pairs
from lightjax.data.prompts import PromptStyle
from lightjax.data.records import is_instruction_source, load_records
from lightjax.data.rows import Rows, open_rows
from lightjax.data.sources import load_split, prepare_source, source_files
from lightjax.data.tokenizers import Tokenizer, load_tokenizer, make_tokenizer, tokenizer_fingerprint
from lightjax.data.tokens import read_meta, text_units
from lightjax.runtime.distributed import barrier, is_leader, leader_value, print_once, run_everywhere, run_once
from lightjax.runtime.files import content_fingerprint


def prepare_tokenizer(config: Any, workdir: epath.Path) -> Tokenizer:
    """The run's tokenizer: the one saved in WORKDIR/tokenizer/ when resuming, else built (once, by
    process 0, from the training split) and saved there; every process then loads the saved one."""
    saved = workdir / "tokenizer"

    def build() -> None:
        if not (saved / "tokenizer.json").exists():
            train_docs = None
            if config.data.tokenizer == "char":  # built from the training text; the others need no data
                prepare_source(config.data)
                train_docs = load_split(config.data, "train")
            make_tokenizer(config.data.tokenizer, train_docs).save(saved)

    run_once("building the tokenizer", build)
    return load_tokenizer(saved)


def split_suffix(data: Any) -> str:
    """The file suffix of `config.data`'s prepared splits."""
    if is_preference_source(data.source):
        return PAIRS_SUFFIX
    return EXAMPLES_SUFFIX if is_instruction_source(data.source) else ".tokens"


def write_split(data: Any, split: str, tokenizer_dir: str | epath.PathLike, path: str | epath.PathLike,
                provenance: dict[str, Any] | None = None, workers: int = 1, progress: bool = False) -> dict[str, Any]:
    """Tokenize `split` of `config.data`'s source into `path` (named with `split_suffix`) here, on `workers`
    cores, with the tokenizer saved in `tokenizer_dir`; returns the split's metadata (its tokens,
    characters and bytes among them)."""
    provenance = provenance or {}
    if is_instruction_source(data.source):
        records = load_records(data.source, split, data.val_fraction)
        tokenizer, style = load_tokenizer(tokenizer_dir), PromptStyle(data.prompt_style, data.tokenizer)
        write = write_pairs if is_preference_source(data.source) else write_examples
        return write(records, style, tokenizer, path, provenance)
    docs = load_split(data, split)
    with worker_pool(workers) as pool:
        _tokenize_share(docs, split, tokenizer_dir, path, provenance, (0, 1), pool, progress)
    return join_chunks(path, len(split_chunks(docs)), provenance)


def _tokenize_share(docs: Any, split: str, tokenizer_dir: str | epath.PathLike, path: str | epath.PathLike,
                    provenance: dict[str, Any], shard: tuple[int, int], pool: Any, progress: bool) -> None:
    """This process's chunks of a text split (`shard` = (its index, the process count)) in `pool`'s workers
    (`chunks.worker_pool`), with a progress bar."""
    total = len(docs) if hasattr(docs, "__len__") else None  # a stream's length is known once read
    bar = Progress(total, split if shard[1] == 1 else f"{split}, process {shard[0]}/{shard[1]}", progress)
    try:
        write_chunks(docs, tokenizer_dir, path, provenance, shard, pool, bar)
    finally:
        bar.close()


def prepare_workers(data: Any, source_bytes: int) -> int:
    """Worker processes per process for tokenizing: data.prepare_workers, or with 0 every core of the
    machine for a source over 64 MB (a worker starts in a few seconds; below that one core is as quick)."""
    if data.prepare_workers:
        return data.prepare_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores if source_bytes > 64 << 20 or data.get("hf_streaming") else 1


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


def tokens_directory(config: Any, workdir: str | epath.PathLike) -> epath.Path:
    """Where a run's split files are: config.data.tokens_dir, or WORKDIR/data."""
    return epath.Path(config.data.tokens_dir) if config.data.tokens_dir else epath.Path(workdir) / "data"


def prepare_splits(config: Any, directory: epath.Path, tokenizer_dir: epath.Path,
                   progress: bool = False) -> PreparedSplits:
    """{train,validation}.tokens (instruction sources: .examples.npz) in `directory` (`tokens_directory`):
    the splits tokenized when missing, a text source by every process (each its share of the chunks;
    process 0 shows a progress bar of its share with `progress`). Files there are reused only when made
    from the same data settings, the same source bytes and the same tokenizer (fingerprints in their
    metadata); files made otherwise are left
    alone, and this run's are made in a subfolder named by its fingerprint."""
    d = config.data
    suffix = split_suffix(d)
    run_once("preparing the data source", lambda: prepare_source(d))
    files = source_files(d)
    provenance = {**{k: d[k] for k in _SPLIT_FILE_KEYS}, **({"hf_streaming": True} if d.get("hf_streaming") else {}),
                  "format": _FORMAT,
                  "source_fingerprint": content_fingerprint(files),
                  "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer_dir)}
    key = hashlib.sha256(json.dumps(provenance, sort_keys=True).encode()).hexdigest()[:12]

    def decide() -> list[int]:  # [the folder's key (0: `directory` itself), the splits to prepare as bits]
        folder = _split_folder(directory, suffix, provenance, key)
        return [0 if folder == directory else int(key, 16),
                sum(1 << i for i, split in enumerate(_SPLITS)
                    if not _made_from(read_meta(folder / f"{split}{suffix}"), provenance))]

    # Process 0's view decides for every process: a TFDS source (its fingerprint) is in its data_dir alone.
    chosen, mask = (int(x) for x in leader_value(np.asarray(run_once("choosing the data folder", decide) or [0, 0])))
    folder = directory if chosen == 0 else directory / f"{chosen:012x}"
    workers = prepare_workers(d, sum(f.stat().length for f in files))
    todo = [split for i, split in enumerate(_SPLITS) if mask >> i & 1]
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(worker_pool(workers)) if todo and _every_process_tokenizes(d) else None
        for split in todo:
            path, start = folder / f"{split}{suffix}", time.perf_counter()
            meta = _prepare_split(d, split, tokenizer_dir, path, provenance, workers, pool, progress)
            if meta is not None:
                print(_prepared_line(meta, split, path, time.perf_counter() - start), flush=True)
            barrier(f"prepared the {split} split")
    return PreparedSplits({split: folder / f"{split}{suffix}" for split in _SPLITS}, d.seq_len, d.pack,
                          d.document_mask)


@dataclasses.dataclass(frozen=True)
class PreparedMixture:
    """A mixture's sources, each prepared into its own split files (mixture.py)."""

    mixture: Mixture
    splits: tuple[PreparedSplits, ...]

    def train_rows(self, seed: int, global_batch: int) -> MixedRows:
        return MixedRows([s.rows("train", training=True) for s in self.splits], self.mixture, seed, global_batch)

    def val_rows(self) -> dict[str, Rows]:
        return {n: s.rows("validation", training=False) for n, s in zip(self.mixture.names, self.splits, strict=True)}

    def tokens_per_char(self) -> dict[str, float]:
        return {n: s.tokens_per_char("validation") for n, s in zip(self.mixture.names, self.splits, strict=True)}


def prepare_mixture(config: Any, workdir: epath.Path, tokenizer_dir: epath.Path, mixture: Mixture,
                    progress: bool = False) -> PreparedMixture:
    """Each source of `mixture` prepared as `prepare_splits` prepares one, into its own tokens_dir (default
    TOKENS_DIR/NAME, TOKENS_DIR being the run's `tokens_directory`), where other runs reuse it."""
    splits = []
    for name, data in zip(mixture.names, mixture.data, strict=True):
        own = config.data.mixture[name].get("tokens_dir")
        directory = epath.Path(own) if own else tokens_directory(config, workdir) / name
        source_config = copy.deepcopy(config)
        with source_config.unlocked():
            source_config.data = data
        print_once(f"Mixture source {name!r}: {data.source}")
        splits.append(prepare_splits(source_config, directory, tokenizer_dir, progress))
    return PreparedMixture(mixture, tuple(splits))


def _prepared_line(meta: dict[str, Any], split: str, path: epath.Path, seconds: float) -> str:
    """'Prepared 1,003,854 train tokens into PATH in 2.1 s (0.5 MB/s, 478,026 tokens/s).'"""
    count = next(((meta[k], k) for k in ("examples", "pairs") if k in meta), (meta["tokens"], "tokens"))
    seconds = max(seconds, 1e-9)
    return (f"Prepared {count[0]:,} {split} {count[1]} into {path} in {seconds:.1f} s "
            f"({meta['bytes'] / seconds / 1e6:.1f} MB/s, {meta['tokens'] / seconds:,.0f} tokens/s).")


def _every_process_tokenizes(d: Any) -> bool:
    """Whether every process tokenizes its share of the source: text sources; instruction records and TFDS
    datasets (prepared in process 0's data_dir) are process 0's alone."""
    return not (is_instruction_source(d.source) or d.source == "tiny_shakespeare" or d.source.startswith("tfds:"))


def _prepare_split(d: Any, split: str, tokenizer_dir: epath.Path, path: epath.Path, provenance: dict[str, Any],
                   workers: int, pool: Any, progress: bool) -> dict[str, Any] | None:
    """One split file, in a job of any number of processes: a text source's chunks by every process (in
    `pool`'s workers), then joined by process 0; the other sources by process 0. Its metadata on process 0,
    None elsewhere."""
    if not _every_process_tokenizes(d):
        return run_once(f"preparing the {split} split", lambda: write_split(d, split, tokenizer_dir, path, provenance,
                                                                            workers, progress))
    docs = load_split(d, split)
    run_everywhere(f"tokenizing the {split} split", lambda: _tokenize_share(
        docs, split, tokenizer_dir, path, provenance, process_shard(), pool, progress and is_leader()))
    return run_once(f"joining the {split} split", lambda: join_chunks(path, len(split_chunks(docs)), provenance))


def _made_from(meta: dict[str, Any] | None, provenance: dict[str, Any]) -> bool:
    return meta is not None and all(meta.get(k) == v for k, v in provenance.items())


def _split_folder(directory: epath.Path, suffix: str, provenance: dict[str, Any], key: str) -> epath.Path:
    """Where this run's split files are: `directory` unless it holds files made from other data or
    another tokenizer (never overwritten: another run may be reading them), else directory/KEY."""
    metas = [read_meta(directory / f"{split}{suffix}") for split in _SPLITS]
    if all(m is None or _made_from(m, provenance) for m in metas):
        return directory
    print(f"The token files in {directory} were made from other data or another tokenizer; this run's are in "
          f"{directory / key}.", flush=True)
    return directory / key
