"""Tokenizers behind one interface: character (nanoGPT's shakespeare_char), byte, SentencePiece, and
Hugging Face `tokenizer.json` files (for imported checkpoints).

Every tokenizer has `encode(text) -> int32 array`, `decode(ids) -> str`, `vocab_size`, `bos_id`,
`eos_id`, `pad_id` (None when it has no such token), and `save(dir)`; `load_tokenizer(dir)` reads any
of them back. A run saves its tokenizer into `WORKDIR/tokenizer/` so that generation and evaluation
decode exactly what training encoded.

`encode` gives a text's own tokens (what training data is made of); `encode_with_special_tokens` adds
what a Hugging Face tokenizer adds by default (a Llama's BOS), which is how the model's Hugging Face
users, and the lm-evaluation-harness, feed it text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
from etils import epath
from tokenizers import Tokenizer as FastTokenizer

from lightjax.data.text import pieces
from lightjax.runtime.files import content_fingerprint, write_atomic

META_FILE = "tokenizer.json"
TOKENIZERS = ("char", "byte", "spm:PATH", "hf:DIR")  # config.data.tokenizer
# What a Hugging Face tokenizer folder holds beside tokenizer.json or tokenizer.model, and AutoTokenizer
# reads: special tokens, chat templates, added tokens, BPE files. Saved with the tokenizer, so that an
# export carries them (additional_chat_templates/ is a folder of named templates).
HF_COMPANION_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
                      "added_tokens.json", "vocab.json", "merges.txt", "additional_chat_templates")


class Tokenizer:
    kind: str
    vocab_size: int
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        raise NotImplementedError

    def encode_with_special_tokens(self, text: str) -> np.ndarray:
        """`text`'s ids as the model's Hugging Face tokenizer gives them by default (add_special_tokens=True);
        the plain ids for a tokenizer that adds nothing (lightjax's own, which train without a BOS)."""
        return self.encode(text)

    def save(self, directory: str | epath.PathLike) -> epath.Path:
        directory = epath.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / META_FILE, json.dumps({"kind": self.kind, **self._state(directory)}, indent=1))
        return directory

    def _state(self, directory: epath.Path) -> dict[str, Any]:
        raise NotImplementedError


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


class CharTokenizer(Tokenizer):
    """One id per character, ids in sorted character order (nanoGPT's shakespeare_char). No special
    tokens, so that Tiny Shakespeare's vocabulary is exactly its 65 characters."""

    kind = "char"

    def __init__(self, chars: str):
        if not chars or len(set(chars)) != len(chars):
            raise ValueError("A character tokenizer needs a non-empty string of distinct characters.")
        self.chars = "".join(sorted(chars))
        self.vocab_size = len(self.chars)
        self._codes = _codepoints(self.chars)  # sorted, for a vectorised lookup

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        if not text:
            raise ValueError("Cannot build a character tokenizer from empty text.")
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> np.ndarray:
        codes = _codepoints(text)
        ids = np.searchsorted(self._codes, codes)
        unknown = (ids >= self.vocab_size) | (self._codes[np.minimum(ids, self.vocab_size - 1)] != codes)
        if unknown.any():
            pos = int(np.argmax(unknown))
            raise ValueError(f"Character {text[pos]!r} at offset {pos} is not in the character tokenizer's "
                             f"vocabulary of {self.vocab_size} (built from the training split).")
        return ids.astype(np.int32)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        return self._codes[ids].astype("<u4").tobytes().decode("utf-32-le")

    def _state(self, directory: epath.Path) -> dict[str, Any]:
        return {"chars": self.chars}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255, then EOS = 256. Any text round-trips; nothing is ever unknown."""

    kind = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def _state(self, directory: epath.Path) -> dict[str, Any]:
        return {}


class SentencePieceTokenizer(Tokenizer):
    kind = "spm"
    MODEL_FILE = "tokenizer.model"

    def __init__(self, model_path: str | epath.PathLike, companions: str | epath.PathLike | None = None):
        self.model_path = epath.Path(model_path)
        self.companions = epath.Path(companions) if companions else None  # a Hugging Face folder's other files
        if not self.model_path.is_file():
            raise FileNotFoundError(f"SentencePiece model {self.model_path} does not exist.")
        self._sp = spm.SentencePieceProcessor(model_proto=self.model_path.read_bytes())
        self.vocab_size = self._sp.get_piece_size()
        # SentencePiece says -1 for a special token the model does not have.
        self.bos_id, self.eos_id, self.pad_id = (None if i < 0 else int(i) for i in
                                                 (self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()))
        self._added = self._added_ids()

    def __getstate__(self) -> dict[str, Any]:  # Grain workers get a pickled copy: reload the model there
        return {"model_path": self.model_path, "companions": self.companions}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["model_path"], state["companions"])

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._sp.decode([int(i) for i in ids])  # drops BOS/EOS/PAD (control pieces) either way

    def encode_with_special_tokens(self, text: str) -> np.ndarray:
        """With BOS (and EOS) where the Hugging Face folder's tokenizer_config.json says so (add_bos_token,
        add_eos_token; a Llama or Gemma folder adds BOS by default); plain for a tokenizer lightjax trained."""
        head, tail = self._added
        return np.concatenate([np.asarray(head, np.int32), self.encode(text), np.asarray(tail, np.int32)])

    def _added_ids(self) -> tuple[list[int], list[int]]:
        settings = self.companions / "tokenizer_config.json" if self.companions else None
        if settings is None or not settings.is_file():
            return [], []
        flags = json.loads(settings.read_text())
        head = [self.bos_id] if flags.get("add_bos_token", True) and self.bos_id is not None else []
        tail = [self.eos_id] if flags.get("add_eos_token", False) and self.eos_id is not None else []
        return head, tail

    def _state(self, directory: epath.Path) -> dict[str, Any]:
        _copy_unless_same(self.model_path, directory / self.MODEL_FILE)
        _copy_companions(self.companions, directory)
        return {"model_file": self.MODEL_FILE}


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (fast tokenizer), read with the `tokenizers` package. Special
    ids come from the checkpoint's config.json when it is beside the file."""

    kind = "hf"
    SAVED_FILE = "hf_tokenizer.json"  # `tokenizer.json` is lightjax's own metadata file

    def __init__(self, path: str | epath.PathLike, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None):
        self.path = epath.Path(path)  # its companion files (HF_COMPANION_FILES) are the ones beside it
        self._tok = FastTokenizer.from_str(self.path.read_text())
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "ids": (self.bos_id, self.eos_id, self.pad_id)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], *state["ids"])

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def encode_with_special_tokens(self, text: str) -> np.ndarray:
        """With what the file's post-processor adds (transformers' tokenizers follow it too)."""
        return np.asarray(self._tok.encode(text, add_special_tokens=True).ids, dtype=np.int32)

    def _state(self, directory: epath.Path) -> dict[str, Any]:
        _copy_unless_same(self.path, directory / self.SAVED_FILE)
        _copy_companions(self.path.parent, directory)
        return {"file": self.SAVED_FILE, "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id}


def _same(source: epath.Path, target: epath.Path) -> bool:
    return "://" not in str(source) + str(target) and Path(source).resolve() == Path(target).resolve()


def _copy_unless_same(source: epath.Path, target: epath.Path) -> None:
    if not _same(source, target):
        source.copy(target, overwrite=True)


def _copy_companions(source: epath.Path | None, directory: epath.Path) -> None:
    """The Hugging Face tokenizer files found in `source` (HF_COMPANION_FILES), copied into `directory`."""
    if source is None or _same(source, directory):
        return
    for name in HF_COMPANION_FILES:
        path = source / name
        if path.is_dir():
            (directory / name).mkdir(exist_ok=True)
            for f in path.glob("*.jinja"):
                f.copy(directory / name / f.name, overwrite=True)
        elif path.is_file():
            path.copy(directory / name, overwrite=True)


def load_hf_tokenizer(directory: str | epath.PathLike) -> Tokenizer:
    """The tokenizer of a Hugging Face checkpoint directory: `tokenizer.model` (SentencePiece) or
    `tokenizer.json` (with the `tokenizers` package)."""
    directory = epath.Path(directory)
    if (directory / SentencePieceTokenizer.MODEL_FILE).is_file():
        return SentencePieceTokenizer(directory / SentencePieceTokenizer.MODEL_FILE, directory)
    if (directory / "tokenizer.json").is_file():
        config = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else {}
        ids = [config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")]
        ids = [i[0] if isinstance(i, list) else i for i in ids]  # some models list several EOS ids
        return HFTokenizer(directory / "tokenizer.json", *ids)
    raise FileNotFoundError(f"No tokenizer.model or tokenizer.json in {directory}.")


def save_hf_tokenizer(saved: str | epath.PathLike, out: str | epath.PathLike) -> str:
    """A tokenizer saved by lightjax (`Tokenizer.save`) written as a Hugging Face folder holds it, into
    `out`: tokenizer.json or tokenizer.model and its companion files. Returns what was written, in words."""
    saved, out = epath.Path(saved), epath.Path(out)
    meta_path = saved / META_FILE
    if not meta_path.is_file():
        return "no tokenizer to write"
    meta = json.loads(meta_path.read_text())
    if meta["kind"] not in ("hf", "spm"):
        return f"the {meta['kind']!r} tokenizer has no Hugging Face file: decode ids with lightjax's"
    main = ("tokenizer.json", meta["file"]) if meta["kind"] == "hf" else ("tokenizer.model", meta["model_file"])
    (saved / main[1]).copy(out / main[0], overwrite=True)
    _copy_companions(saved, out)
    written = [main[0]] + sorted(name for name in HF_COMPANION_FILES if (out / name).exists())
    return f"{', '.join(written)} written"


def tokenizer_fingerprint(directory: str | epath.PathLike) -> str:
    """A sha256 of a saved tokenizer's files: token files are reused only by a run with the same one."""
    return content_fingerprint([p for p in epath.Path(directory).iterdir() if p.is_file()])


def load_tokenizer(directory: str | epath.PathLike) -> Tokenizer:
    """A tokenizer saved with `Tokenizer.save`."""
    directory = epath.Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"No {META_FILE} in {directory}: not a saved lightjax tokenizer.")
    meta = json.loads(meta_path.read_text())
    if meta["kind"] == "char":
        return CharTokenizer(meta["chars"])
    if meta["kind"] == "byte":
        return ByteTokenizer()
    if meta["kind"] == "spm":
        return SentencePieceTokenizer(directory / meta["model_file"], directory)
    if meta["kind"] == "hf":
        return HFTokenizer(directory / meta["file"], meta["bos_id"], meta["eos_id"], meta["pad_id"])
    raise ValueError(f"{meta_path}: unknown tokenizer kind {meta['kind']!r}; known: 'char', 'byte', 'spm', 'hf'.")


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Every token id must have an embedding row: checked before training starts."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(f"The {tokenizer.kind} tokenizer has {tokenizer.vocab_size} tokens but the model's "
                         f"vocab_size is {model_vocab_size}; set --config.model.vocab_size={tokenizer.vocab_size} "
                         "(or larger).")


def is_known_tokenizer(spec: str) -> bool:
    """Whether `config.data.tokenizer` names a kind of tokenizer (TOKENIZERS)."""
    return spec in ("char", "byte") or spec.startswith(("spm:", "hf:"))


def make_tokenizer(spec: str, train_docs: Sequence[str] | None = None) -> Tokenizer:
    """From `config.data.tokenizer`: 'char' (built from the training documents), 'byte', 'spm:PATH'
    (a SentencePiece model), or 'hf:DIR' (a Hugging Face checkpoint's tokenizer.model or tokenizer.json)."""
    if spec == "char":
        if train_docs is None:
            raise ValueError("The 'char' tokenizer is built from the training split's text; none was given.")
        chars: set[str] = set()
        for i in range(len(train_docs)):
            for piece in pieces(train_docs[i]):
                chars.update(piece)
        return CharTokenizer.from_text("".join(chars))
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("spm:"):
        return SentencePieceTokenizer(spec[len("spm:"):])
    if spec.startswith("hf:"):
        return load_hf_tokenizer(spec[len("hf:"):])
    raise ValueError(f"config.data.tokenizer={spec!r} is not one of {', '.join(map(repr, TOKENIZERS))}.")


def train_sentencepiece(text_files: list[str | Path], model_prefix: str | Path, vocab_size: int,
                        model_type: str = "bpe", character_coverage: float = 0.9995) -> SentencePieceTokenizer:
    """Train a SentencePiece model whose encode/decode round-trips text exactly: no normalisation,
    whitespace kept as is, no dummy prefix, and unknown characters spelled as bytes."""
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type={model_type!r} is not one of 'bpe', 'unigram'.")
    for f in text_files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"Tokenizer training file {f} does not exist.")
    Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=[str(f) for f in text_files], model_prefix=str(model_prefix), vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, split_digits=True, max_sentence_length=1 << 16,
        minloglevel=2,
    )
    return SentencePieceTokenizer(f"{model_prefix}.model")
