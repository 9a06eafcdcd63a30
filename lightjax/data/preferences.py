"""Preference pairs for DPO: a prompt and two responses to it, the chosen and the rejected. A `json:` or
`jsonl:` source (records.py reads it) holds records of one of TRL's forms:

    {"prompt": "...", "chosen": "...", "rejected": "..."}          (the prompt rendered as an instruction)
    {"chosen": [messages], "rejected": [messages]}                 (chat; the two share every turn but
                                                                    the last, the assistant's response)
    {"prompt": [messages], "chosen": [messages], "rejected": [messages]}   (chat, the prompt apart)

Each side is rendered by the run's prompt style (prompts.py) as an instruction record would be, so both
share one prompt text, and tokenized once into WORKDIR/data/SPLIT.pairs.npz (BOS, prompt, response, EOS
per side, as examples.py does). `PairRows` gives rows of seq_len + 1 tokens holding a pair: the chosen
sequence then the rejected one, each its own document (segment 1 and 2, positions from 0, so neither
sees the other), with `chosen_mask` and `rejected_mask` marking the targets that are each response's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from etils import epath

from lightjax.data.examples import write_sequences
from lightjax.data.prompts import PromptStyle
from lightjax.data.records import Record, as_messages
from lightjax.data.tokenizers import Tokenizer

PAIRS_SUFFIX = ".pairs.npz"


def is_preference_record(record: Any) -> bool:
    return isinstance(record, dict) and "chosen" in record and "rejected" in record


def is_preference_source(source: str) -> bool:
    """Whether a json:/jsonl: source holds preference pairs (its first record has 'chosen' and 'rejected'):
    a run on them is preference tuning, as TRL's DPOTrainer takes such a dataset. False when the source
    cannot be read here (its errors are said where it is read)."""
    if not source.startswith(("json:", "jsonl:")):
        return False
    kind, name = source.split(":", 1)
    path = epath.Path(name)
    path = path / f"train.{kind}" if path.is_dir() else path
    try:
        with path.open("r", encoding="utf-8") as f:  # a JSON Lines file's first record only: start-up reads it
            first = (json.load(f)[:1] or [None])[0] if kind == "json" else json.loads(
                next((line for line in f if line.strip()), "null"))
    except (OSError, ValueError, UnicodeDecodeError, TypeError, KeyError):
        return False
    return is_preference_record(first)


def as_pair(record: Record) -> tuple[Record, Record]:
    """The record's two sides as instruction records (records.py's forms) with the same prompt; a
    ValueError naming the record when it is neither of the preference forms or its sides differ in more
    than their responses."""
    if not is_preference_record(record):
        raise ValueError(f"{record.where}: a preference record needs 'chosen' and 'rejected' (and a 'prompt' unless "
                         f"both are conversations); it has {sorted(record)}.")
    prompt, chosen, rejected = record.get("prompt"), record["chosen"], record["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str):
            raise ValueError(f"{record.where}: string 'chosen' and 'rejected' need a string 'prompt' (it is "
                             f"{type(prompt).__name__}).")
        sides = [{"instruction": prompt, "output": chosen}, {"instruction": prompt, "output": rejected}]
    elif isinstance(chosen, list) and isinstance(rejected, list):
        turns = prompt if isinstance(prompt, list) else []
        sides = [{"messages": turns + chosen}, {"messages": turns + rejected}]
    else:
        raise ValueError(f"{record.where}: 'chosen' and 'rejected' must both be strings or both lists of messages.")
    pair = []
    for side in sides:
        r = Record(side)
        r.where = record.where
        pair.append(r)
    chosen_turns, rejected_turns = as_messages(pair[0])[:-1], as_messages(pair[1])[:-1]
    if chosen_turns != rejected_turns:
        raise ValueError(f"{record.where}: 'chosen' and 'rejected' differ before their last (assistant) turn; a "
                         "pair answers one prompt.")
    return pair[0], pair[1]


def write_pairs(records: Sequence[Record], style: PromptStyle, tokenizer: Tokenizer, path: str | epath.PathLike,
                provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tokenize each record's two sides into `path` (examples.write_sequences: the sides one after another,
    chosen then rejected) and its metadata, written last. Returns the metadata."""
    return write_sequences(_sides(records, style), tokenizer, path, {"pairs": len(records)}, provenance)


def _sides(records: Sequence[Record], style: PromptStyle) -> Iterator[tuple[str, str]]:
    for record in records:
        texts = [style(side) for side in as_pair(record)]
        if texts[0][0] != texts[1][0]:
            raise ValueError(f"{record.where}: the prompt style renders the two sides' prompts differently.")
        yield from texts


class PairRows(Sequence):
    """Rows of seq_len + 1 tokens, one pair each: the chosen side, then the rejected side, each at most half
    the row; a side longer than that loses its end (`note` counts the pairs cut)."""

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, prompt_lens: np.ndarray, seq_len: int,
                 where: str = "the pairs"):
        """`write_pairs`'s arrays: every side's ids one after another (chosen, rejected, chosen, ...), where
        each starts (and, last, where the final one ends), and each side's prompt length."""
        self.tokens, self.prompt_lens = np.asarray(tokens), np.asarray(prompt_lens)
        self.seq_len, self.starts, self.ends = seq_len, np.asarray(starts)[:-1], np.asarray(starts)[1:]
        if not len(self.starts):
            raise ValueError(f"{where} hold no preference pairs.")
        self.half = (seq_len + 1) // 2
        lengths = self.ends - self.starts
        self.cut = int(np.sum(np.any((lengths > self.half).reshape(-1, 2), axis=1)))
        self.unlearnable = int(np.sum(np.any((self.prompt_lens >= self.half).reshape(-1, 2), axis=1)))
        if self.unlearnable == len(self):
            raise ValueError(f"config.data.seq_len={seq_len} leaves no response token of any pair in {where} (a side "
                             f"gets {self.half} tokens of the row and the shortest prompt has "
                             f"{int(self.prompt_lens.min())}); raise data.seq_len.")

    @classmethod
    def load(cls, path: str | epath.PathLike, seq_len: int) -> PairRows:
        """The rows of a `write_pairs` file."""
        with epath.Path(path).open("rb") as f:
            data = np.load(f)
            return cls(data["tokens"], data["starts"], data["prompt_lens"], seq_len, str(path))

    @property
    def note(self) -> str:
        if not self.cut:
            return ""
        return (f"{self.cut} of {len(self)} pairs have a side longer than half a row ({self.half} tokens of "
                f"data.seq_len + 1 = {self.seq_len + 1}) and lose its end ({self.unlearnable} a whole response).")

    def __len__(self) -> int:
        return len(self.starts) // 2

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:  # type: ignore[override]
        n = self.seq_len + 1
        tokens, segments, positions = np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.int32)
        masks = [np.zeros(n, np.int32), np.zeros(n, np.int32)]
        at = 0
        for side in (0, 1):
            e = 2 * i + side
            ids = self.tokens[self.starts[e]: self.ends[e]][: self.half]
            tokens[at: at + len(ids)] = ids
            masks[side][at + self.prompt_lens[e]: at + len(ids)] = 1  # the response's tokens, as targets
            segments[at: at + len(ids)], positions[at: at + len(ids)] = side + 1, np.arange(len(ids))
            at += len(ids)
        return {"tokens": tokens, "chosen_mask": masks[0][1:], "rejected_mask": masks[1][1:],
                "segment_ids": segments[:-1], "positions": positions[:-1]}

    def close(self) -> None:
        """Nothing to close: the pairs are held in memory."""
