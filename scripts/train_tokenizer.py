"""Train a SentencePiece tokenizer (BPE or unigram) that round-trips text exactly.

    python scripts/train_tokenizer.py --input 'data/*.txt' --vocab_size 16000 --out tokenizers/spm16k
    python scripts/train_tokenizer.py --tiny_shakespeare path/to/input.txt \\
        --vocab_size 16000 --out tokenizers/shakespeare_spm16k

With --tiny_shakespeare it trains on the training split only (TFDS's first 90% of the characters),
so validation text stays unseen. Writes OUT/tokenizer.model and OUT/tokenizer.json (lightjax's
format); use it as --config.data.tokenizer=spm:OUT/tokenizer.model.
"""

import glob
import sys
import tempfile
from pathlib import Path

from absl import flags

from lightjax.runtime.cli import define_overwrite_flag

_INPUT = flags.DEFINE_string("input", "", "Glob of UTF-8 text files to train on.")
_TINY = flags.DEFINE_string("tiny_shakespeare", "", "Path of Tiny Shakespeare's input.txt: train on its train split.")
_VOCAB = flags.DEFINE_integer("vocab_size", 16000, "Number of pieces.")
_TYPE = flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "SentencePiece algorithm.")
_COVERAGE = flags.DEFINE_float("character_coverage", 0.9995, "Share of characters given their own piece "
                               "(the rest are spelled as bytes); below 1.0 for small vocabularies.")
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_OVERWRITE = define_overwrite_flag()


def main(argv):
    del argv
    from lightjax.data import tiny_shakespeare
    from lightjax.data.tokenizers import train_sentencepiece
    from lightjax.runtime.files import check_output_dir, staged_dir

    out = Path(_OUT.value)
    try:
        check_output_dir(out, "tokenizer", _OVERWRITE.value)
        with tempfile.TemporaryDirectory() as tmp:
            if _TINY.value:
                train_file = Path(tmp) / "train.txt"
                train_file.write_text(tiny_shakespeare.split(tiny_shakespeare.read_verified(_TINY.value))["train"])
                files = [train_file]
            else:
                files = sorted(glob.glob(_INPUT.value))
                if not files:
                    raise FileNotFoundError(f"--input={_INPUT.value!r} matches no file.")
            tok = train_sentencepiece(files, Path(tmp) / "spm", _VOCAB.value, _TYPE.value, _COVERAGE.value)
            with staged_dir(out, "tokenizer", _OVERWRITE.value) as stage:
                tok.save(stage)
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"train_tokenizer: {e}")
    print(f"Wrote {out}/tokenizer.model ({tok.vocab_size} pieces, {_TYPE.value}).")


if __name__ == "__main__":
    from lightjax.runtime.cli import run_script

    run_script(main, "train_tokenizer")
