"""Prepare the configured data source and tokenizer, and print what they hold.

    python scripts/prepare_data.py --config configs/baseline.py
    python scripts/prepare_data.py --config configs/baseline.py \\
        --config.data.local_path=path/to/input.txt          # offline
    python scripts/prepare_data.py --config configs/baseline.py \\
        --config.data.tokenizer=spm:tokenizers/spm16k/tokenizer.model --spm_vocab_size=16000

Downloads (or reads `data.local_path`) and prepares the TFDS source, builds the tokenizer (training a
SentencePiece model on the training split when `--spm_vocab_size` is given and the model does not
exist yet), and prints documents, characters, tokens and tokens per character for each split.
"""

import shutil
import sys
import tempfile
from pathlib import Path

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/baseline.py", "Run config file.", lock_config=True)
_SPM_VOCAB = flags.DEFINE_integer("spm_vocab_size", 0, "Train the spm:PATH tokenizer with this many pieces "
                                  "if PATH does not exist yet.")


def main(argv):
    del argv
    from lightjax.data.sources import load_split, source_splits
    from lightjax.data.text import pieces
    from lightjax.data.tokenizers import make_tokenizer, train_sentencepiece
    from lightjax.data.tokens import count_tokens

    data = _CONFIG.value.data
    try:
        docs = {split: load_split(data, split) for split in source_splits(data)}
        spec = data.tokenizer
        if spec.startswith("spm:") and not Path(spec[4:]).exists() and _SPM_VOCAB.value:
            target = Path(spec[4:])
            with tempfile.TemporaryDirectory() as tmp:
                train_file = Path(tmp) / "train.txt"
                with open(train_file, "w") as f:
                    for i in range(len(docs["train"])):
                        f.writelines(pieces(docs["train"][i]))
                        f.write("\n")
                train_sentencepiece([train_file], Path(tmp) / "spm", _SPM_VOCAB.value)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(tmp) / "spm.model", target)
        tokenizer = make_tokenizer(spec, docs["train"])
        print(f"source {data.source}, tokenizer {spec} ({tokenizer.vocab_size} tokens), seq_len {data.seq_len}")
        for split, split_docs in docs.items():
            c = count_tokens(split_docs, tokenizer)
            print(f"  {split:10s} {c['documents']:>9,} documents {c['characters']:>14,} characters "
                  f"{c['tokens']:>14,} tokens  {c['tokens_per_char']:.4f} tokens/char")
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"prepare_data: {e}")


if __name__ == "__main__":
    from lightjax.runtime.cli import run_script

    run_script(main, "prepare_data")
