"""Rows: what the loader, the train step and evaluation read, whatever the source.

A split prepared for a run (prepare.py) is one file: a token stream (`SPLIT.tokens`, tokens.py) for
text sources, or tokenized examples (`SPLIT.examples.npz`, examples.py) for instruction records.
`open_rows` opens either as `Rows`, a random-access sequence of dicts

    tokens       [seq_len + 1] int32  the model reads tokens[:-1] and predicts tokens[1:]
    mask         [seq_len] int32      1 where target j counts: 0 for padding and for prompt tokens
    segment_ids  [seq_len] int32      with document masks: which document input j belongs to (1, 2, ...
                                      within the row; 0 for padding): attention stays inside one
    positions    [seq_len] int32      with document masks: input j's position in its document's part
                                      of the row (RoPE restarts at 0 for each)

with `close()` and `note` (one line about what the rows cut off, '' when nothing). Nobody downstream
asks which kind of rows it holds. Without document masks (`data.document_mask=False`, nanoGPT's way) a
row is one sequence whatever documents it holds, and it has no segment_ids or positions.

A token stream's row i starts at token i * seq_len, so that consecutive rows overlap by one token and
every token is a target once per pass. Training takes the complete rows; evaluation also takes the
last, shorter one, padded and masked, so that every target of the split is counted exactly once.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
from etils import epath

from lightjax.data.examples import EXAMPLES_SUFFIX, ExampleRows
from lightjax.data.preferences import PAIRS_SUFFIX, PairRows
from lightjax.data.tokens import open_document_starts, open_tokens


class Rows(Protocol):
    seq_len: int
    note: str

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class TokenRows:
    """Rows of seq_len + 1 tokens of a token stream, row i starting at token i * seq_len; with `pad_last`
    the last, shorter row too (padded with 0, masked out).

    The stream is an array (with `starts`, its documents' first tokens; default one document), or the path
    of a token file, opened lazily (Grain worker processes receive the path, not the data). With
    `document_mask`, rows carry segment ids and positions of the documents they hold (when the stream
    holds more than one)."""

    note = ""

    def __init__(self, tokens: np.ndarray | str | epath.PathLike, seq_len: int, pad_last: bool = False,
                 name: str = "", document_mask: bool = False, starts: np.ndarray | None = None):
        self.seq_len, self.document_mask = seq_len, document_mask
        self._starts = np.zeros(1, np.int64) if starts is None and isinstance(tokens, np.ndarray) else starts
        name = name or ("the validation split" if pad_last else "the training split")
        if isinstance(tokens, np.ndarray):
            self._path, self._tokens = None, tokens
        else:
            self._path, self._tokens = str(tokens), open_tokens(tokens)
        self.num_tokens = len(self._tokens)
        if self.num_tokens < seq_len + 1:
            raise ValueError(f"config.data.seq_len={seq_len} is longer than {name} ({self.num_tokens} tokens); it "
                             "needs at least seq_len + 1.")
        whole, rest = divmod(self.num_tokens - 1, seq_len)
        self._rows = whole + (pad_last and rest > 0)
        # A stream of one document has nothing to mask: its rows are plain sequences (no extra inputs).
        self.document_mask = document_mask and len(self._document_starts()) > 1

    def _array(self) -> Any:
        if self._tokens is None:
            self._tokens = open_tokens(self._path)
        return self._tokens

    def _document_starts(self) -> np.ndarray:
        if self._starts is None:
            self._starts = open_document_starts(self._path)
        return self._starts

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self._path is not None:
            state["_tokens"] = state["_starts"] = None
        return state

    def __len__(self) -> int:
        return self._rows

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        start = i * self.seq_len
        piece = np.asarray(self._array()[start: start + self.seq_len + 1], dtype=np.int32)
        tokens, mask = np.zeros(self.seq_len + 1, np.int32), np.zeros(self.seq_len, np.int32)
        tokens[: len(piece)], mask[: len(piece) - 1] = piece, 1
        row = {"tokens": tokens, "mask": mask}
        if self.document_mask:
            row["segment_ids"], row["positions"] = self._segments(start, len(piece) - 1)
        return row

    def _segments(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(segment ids, positions) of the row's n inputs from token `start`: a new segment at each
        document start, positions counted from it (or from the row's start)."""
        starts = self._document_starts()
        index = np.arange(start, start + n)
        doc = np.searchsorted(starts, index, side="right") - 1
        segments, positions = np.zeros(self.seq_len, np.int32), np.zeros(self.seq_len, np.int32)
        segments[:n] = doc - doc[0] + 1
        positions[:n] = index - np.maximum(np.asarray(starts)[doc], start)
        return segments, positions

    def close(self) -> None:
        """Close the file behind the rows, if any (they reopen it when read again)."""
        if self._path is not None and self._tokens is not None:
            if hasattr(self._tokens, "close"):
                self._tokens.close()
            self._tokens = None


def open_rows(path: str | epath.PathLike, seq_len: int, training: bool, pack: bool = False,
              document_mask: bool = False) -> Rows:
    """The rows of a prepared split file: a token file's rows (training: the complete ones; evaluation:
    all, the last padded) or an examples file's (one example per row, or packed with `pack`), with
    `document_mask` their segment ids and positions."""
    if str(path).endswith(EXAMPLES_SUFFIX):
        return ExampleRows(path, seq_len, pack, document_mask)
    if str(path).endswith(PAIRS_SUFFIX):  # a preference pair per row, each side its own document
        return PairRows.load(path, seq_len)
    split = epath.Path(path).name.split(".")[0]
    name = f"the {'training' if split == 'train' else split} split"
    return TokenRows(path, seq_len, pad_last=not training, name=name, document_mask=document_mask)
