"""Documents as text: any document, a `str` or a `.txt` file on disk (`TextFile`), is read a piece at a
time (`pieces`), so that no long document is ever held in memory whole. Tokenizers, token files and
evaluation units all read documents through `pieces`."""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from pathlib import Path

# A long document is handled a piece of about this many characters at a time.
PIECE_CHARS = 1 << 20


def pieces(doc: str | TextFile) -> Iterator[str]:
    """A document's text in pieces of about PIECE_CHARS characters, each cut just before a whitespace
    character where there is one (so that a subword tokenizer rarely sees a word cut in two)."""
    chunks = doc.chunks() if isinstance(doc, TextFile) else (doc[i:i + PIECE_CHARS]
                                                              for i in range(0, max(len(doc), 1), PIECE_CHARS))
    rest = ""
    for chunk in chunks:
        rest += chunk
        if len(rest) > PIECE_CHARS:
            cut = max(rest.rfind(" ", 1), rest.rfind("\n", 1))
            cut = cut if cut > 0 else len(rest)
            yield rest[:cut]
            rest = rest[cut:]
    yield rest


class TextFile:
    """A `.txt` document, or a character range of one, read a chunk at a time whenever its text is
    needed (`pieces(doc)`), so that no document is ever held in memory whole. `str(doc)` reads it all."""

    _CHUNK_BYTES = 1 << 20

    def __init__(self, path: Path, start: int = 0, stop: int | None = None):
        self.path, self.start, self._stop = path, start, stop

    def chunks(self) -> Iterator[str]:
        """The text from character `start` to `stop`, in chunks of about 1 MB, validated as UTF-8."""
        decoder, position, offset = codecs.getincrementaldecoder("utf-8")(), 0, 0
        with self.path.open("rb") as f:
            while self._stop is None or position < self._stop:
                data = f.read(self._CHUNK_BYTES)
                try:
                    text = decoder.decode(data, final=not data)
                except UnicodeDecodeError as e:
                    raise ValueError(f"{self.path} is not valid UTF-8 at byte offset {offset + e.start}.") from None
                offset += len(data)
                low, high = self.start - position, (len(text) if self._stop is None else self._stop - position)
                if high > max(low, 0):
                    yield text[max(low, 0):high]
                position += len(text)
                if not data:
                    return

    def __len__(self) -> int:
        if self._stop is None:
            self._stop = self.start + sum(len(c) for c in self.chunks())
        return self._stop - self.start

    def __getitem__(self, s: slice) -> TextFile:
        start, stop, _ = s.indices(len(self))
        return TextFile(self.path, self.start + start, self.start + max(stop, start))

    def __str__(self) -> str:
        return "".join(self.chunks())
