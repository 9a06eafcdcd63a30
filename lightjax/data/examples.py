"""Instruction examples: records rendered (prompts.py) and tokenized into rows whose loss mask covers the
response only (as LitGPT's SFT datasets, with its default of masking the prompt).

Prepared once (process 0, before the first step) into WORKDIR/data/SPLIT.examples.npz: every
example's tokens (BOS, prompt, response, EOS) and its prompt length. `ExampleRows` cuts them into rows
of seq_len + 1 tokens with a mask [seq_len] that is 1 where the target is a response token: one example
per row, padded (`data.pack=False`), or consecutive examples packed into each row (`data.pack=True`). With
document masks (`data.document_mask`, the default) each example of a packed row is its own segment: it
attends to itself only and its positions start at 0; without, it attends to the examples before it in
its row, as in TRL's plain packing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from etils import epath

from lightjax.data.prompts import PromptStyle
from lightjax.data.records import Record
from lightjax.data.tokenizers import Tokenizer
from lightjax.data.tokens import meta_path, write_meta
from lightjax.runtime.files import atomic_path

EXAMPLES_SUFFIX = ".examples.npz"


def prompt_ids(prompt: str, tokenizer: Tokenizer) -> np.ndarray:
    """BOS + the prompt's ids: BOS where the tokenizer has one and the text does not already start with it."""
    head = tokenizer.encode(prompt)
    if tokenizer.bos_id is not None and (not len(head) or head[0] != tokenizer.bos_id):
        head = np.concatenate([[tokenizer.bos_id], head])
    return head.astype(np.int32)


def encode_example(prompt: str, response: str, tokenizer: Tokenizer) -> tuple[np.ndarray, int]:
    """(BOS + prompt + response + EOS ids, the number of prompt ids); EOS where the tokenizer has one
    and the response does not already end with it."""
    head = prompt_ids(prompt, tokenizer)
    tail = tokenizer.encode(response)
    if tokenizer.eos_id is not None and (not len(tail) or tail[-1] != tokenizer.eos_id):
        tail = np.concatenate([tail, [tokenizer.eos_id]])
    return np.concatenate([head, tail]).astype(np.int32), len(head)


def write_examples(records: Sequence[Record], style: PromptStyle, tokenizer: Tokenizer, path: str | epath.PathLike,
                   provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tokenize `records` into `path` (npz: `tokens`, every example's ids one after another, `starts`
    and `prompt_lens`) and its metadata `path`.json, written last. Returns the metadata."""
    return write_sequences((style(r) for r in records), tokenizer, path, {"examples": len(records)}, provenance)


def write_sequences(texts: Iterable[tuple[str, str]], tokenizer: Tokenizer, path: str | epath.PathLike,
                    counts: dict[str, int], provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Each (prompt, response) of `texts` encoded (`encode_example`) into `path` (npz: `tokens` one after
    another, `starts`, `prompt_lens`) and its metadata, written last: `counts` (examples, or pairs) and the
    responses' tokens, characters and bytes, which the loss counts. Returns the metadata."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta_path(path).unlink(missing_ok=True)  # the file is incomplete until its new metadata is written
    ids, prompt_lens, chars, nbytes = [], [], 0, 0
    for prompt, response in texts:
        example, n_prompt = encode_example(prompt, response, tokenizer)
        ids.append(example)
        prompt_lens.append(n_prompt)
        chars, nbytes = chars + len(response), nbytes + len(response.encode("utf-8"))
    starts = np.cumsum([0] + [len(x) for x in ids])
    with atomic_path(path) as partial, partial.open("wb") as f:
        np.savez(f, tokens=np.concatenate(ids) if ids else np.zeros(0, np.int32), starts=starts,
                 prompt_lens=np.asarray(prompt_lens, np.int64))
    response_tokens = int(sum(len(x) - p for x, p in zip(ids, prompt_lens, strict=True)))
    meta = {**counts, "tokens": response_tokens, "all_tokens": int(starts[-1]), "characters": chars,
            "bytes": nbytes, **(provenance or {})}
    write_meta(path, meta)
    return meta


class ExampleRows(Sequence):
    """Rows of seq_len + 1 tokens and their response masks, from a `write_examples` file: one example
    per row (truncated to fit) or, with `pack`, consecutive examples filling each row."""

    def __init__(self, path: str | epath.PathLike, seq_len: int, pack: bool = False, document_mask: bool = False):
        with epath.Path(path).open("rb") as f:
            data = np.load(f)
            self.tokens, starts, self.prompt_lens = data["tokens"], data["starts"], data["prompt_lens"]
        self.seq_len, self.starts, self.ends = seq_len, starts[:-1], starts[1:]
        if not len(self.starts):
            raise ValueError(f"{path} holds no examples.")
        lengths = self.ends - self.starts
        self.cut = int(np.sum(lengths > seq_len + 1))  # examples losing their end to the row length
        self.unlearnable = int(np.sum(self.prompt_lens >= seq_len + 1))  # ... and with it their whole response
        if self.unlearnable == len(lengths):
            raise ValueError(f"config.data.seq_len={seq_len} leaves no response token of any example in {path} "
                             f"(the shortest prompt has {int(self.prompt_lens.min())} tokens); raise data.seq_len.")
        self.rows = _pack(self.ends - self.starts, seq_len + 1) if pack else [[i] for i in range(len(self.starts))]
        self.document_mask = document_mask

    @property
    def note(self) -> str:
        """What the row length cuts off, in a line ('' when every example fits)."""
        if not self.cut:
            return ""
        return (f"{self.cut} of {len(self.starts)} examples are longer than data.seq_len + 1 = {self.seq_len + 1} "
                f"tokens and are cut ({self.unlearnable} lose their whole response).")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        tokens, mask = np.zeros(self.seq_len + 1, np.int32), np.zeros(self.seq_len + 1, np.int32)
        segments, positions = np.zeros(self.seq_len + 1, np.int32), np.zeros(self.seq_len + 1, np.int32)
        at = 0
        for k, e in enumerate(self.rows[i]):
            example = self.tokens[self.starts[e]: self.ends[e]][: self.seq_len + 1 - at]
            tokens[at: at + len(example)] = example
            mask[at + self.prompt_lens[e]: at + len(example)] = 1  # the response's tokens, as targets
            segments[at: at + len(example)], positions[at: at + len(example)] = k + 1, np.arange(len(example))
            at += len(example)
        row = {"tokens": tokens, "mask": mask[1:]}  # mask[j]: whether target j (token j + 1) counts
        if self.document_mask:  # one segment per example; its inputs are tokens 0 .. seq_len - 1
            row["segment_ids"], row["positions"] = segments[:-1], positions[:-1]
        return row

    def close(self) -> None:
        """Nothing to close: the examples are held in memory."""


def _pack(lengths: np.ndarray, row_len: int) -> list[list[int]]:
    """Consecutive examples per row while they fit (an example longer than a row has one to itself)."""
    rows, current, used = [], [], 0
    for i, n in enumerate(lengths):
        if current and used + n > row_len:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    rows.append(current)
    return rows
