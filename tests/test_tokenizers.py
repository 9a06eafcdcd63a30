import subprocess
import sys

import numpy as np
import pytest

from lightjax.data import tiny_shakespeare
from lightjax.data.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    make_tokenizer,
    train_sentencepiece,
)
from tests.helpers import ROOT, SHAKESPEARE

pytestmark = pytest.mark.shakespeare  # reads the local Tiny Shakespeare copy

@pytest.fixture(scope="module")
def splits():
    return tiny_shakespeare.split(tiny_shakespeare.read_verified(SHAKESPEARE))


def test_tiny_shakespeare_split_sizes(splits):
    assert {k: len(v) for k, v in splits.items()} == {"train": 1_003_854, "validation": 55_770, "test": 55_770}


def test_char_tokenizer_of_the_training_split(splits, tmp_path):
    tok = CharTokenizer.from_text(splits["train"])
    assert tok.vocab_size == 65 and tok.eos_id is None
    assert tok.encode("\n")[0] == 0 and tok.decode([0, 1]) == "\n "  # sorted: newline, space, ...
    for text in splits.values():
        ids = tok.encode(text)
        assert ids.dtype == np.int32 and len(ids) == len(text)
        assert tok.decode(ids) == text
    again = load_tokenizer(tok.save(tmp_path / "tok"))
    assert isinstance(again, CharTokenizer) and again.chars == tok.chars


def test_char_tokenizer_rejects_unknown_characters():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"Character 'z' at offset 2 is not in the character tokenizer's vocabulary"):
        tok.encode("abzc")


def test_byte_tokenizer_round_trips_any_text(splits, tmp_path):
    tok = ByteTokenizer()
    for text in [splits["validation"], "naïve – ☃ 日本", ""]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(np.array([104, 105, tok.eos_id])) == "hi"  # specials decode to nothing
    assert isinstance(load_tokenizer(tok.save(tmp_path)), ByteTokenizer)


def test_sentencepiece_round_trips_every_split(splits, tmp_path):
    train = tmp_path / "train.txt"
    train.write_text(splits["train"])
    tok = train_sentencepiece([train], tmp_path / "spm", vocab_size=512)
    assert tok.vocab_size == 512 and tok.eos_id is not None
    for text in list(splits.values()) + ["  leading spaces,\n\n\ttabs and unseen ☃ characters  "]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    assert len(tok.encode(splits["validation"])) < 0.6 * len(splits["validation"])  # it does compress
    again = load_tokenizer(tok.save(tmp_path / "saved"))
    assert isinstance(again, SentencePieceTokenizer)
    np.testing.assert_array_equal(again.encode(splits["test"][:1000]), tok.encode(splits["test"][:1000]))
    # A Hugging Face directory holding it as tokenizer.model (Llama 2, Mistral, Gemma): config.data.tokenizer=hf:DIR.
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "tokenizer.model").write_bytes((tmp_path / "spm.model").read_bytes())
    from_hf = make_tokenizer(f"hf:{hf_dir}")
    assert isinstance(from_hf, SentencePieceTokenizer) and from_hf.vocab_size == 512
    np.testing.assert_array_equal(from_hf.encode(splits["test"][:1000]), tok.encode(splits["test"][:1000]))


def test_train_tokenizer_script(tmp_path):
    """The script over a small corpus (the SentencePiece training itself is tested above on the split)."""
    (tmp_path / "corpus.txt").write_text(SHAKESPEARE.read_text()[:60_000])
    out = subprocess.run([sys.executable, "scripts/train_tokenizer.py", f"--input={tmp_path}/*.txt",
                          "--vocab_size=400", f"--out={tmp_path / 'spm'}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert load_tokenizer(tmp_path / "spm").vocab_size == 400
    bad = subprocess.run([sys.executable, "scripts/train_tokenizer.py", "--input=/nonexistent/*.txt",
                          f"--out={tmp_path / 'x'}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == "train_tokenizer: --input='/nonexistent/*.txt' matches no file."


def test_make_tokenizer_specs(splits):
    assert make_tokenizer("char", ["ab", "bc"]).vocab_size == 3
    assert make_tokenizer("byte").vocab_size == 257
    with pytest.raises(ValueError, match=r"config.data.tokenizer='gpt2' is not one of 'char', 'byte', 'spm:PATH'"):
        make_tokenizer("gpt2")
    with pytest.raises(FileNotFoundError, match="SentencePiece model /nope.model does not exist"):
        make_tokenizer("spm:/nope.model")


def test_checksum_mismatch_and_missing_file(tmp_path):
    wrong = tmp_path / "input.txt"
    wrong.write_text("not shakespeare")
    with pytest.raises(ValueError, match=r"input.txt has sha256 [0-9a-f]{64}, not Tiny Shakespeare's 86c4e6aa"):
        tiny_shakespeare.read_verified(wrong)
    with pytest.raises(FileNotFoundError, match=r"config.data.local_path='/missing/input.txt' does not exist"):
        tiny_shakespeare.read_verified("/missing/input.txt")
