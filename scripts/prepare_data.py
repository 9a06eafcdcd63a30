"""Prepare a run's data ahead of training: the tokenizer and the tokenized splits, in data.tokens_dir.

    python scripts/prepare_data.py --config configs/pretrain_fineweb.py --config.data.tokens_dir=tokens/fineweb
    python scripts/launch.py --processes=4 -- scripts/prepare_data.py --config configs/pretrain_fineweb.py \\
        --config.data.tokens_dir=/shared/tokens/fineweb          # every process tokenizes its share
    python scripts/prepare_data.py --config configs/baseline.py --config.data.tokens_dir=tokens/shakespeare \\
        --config.data.tokenizer=spm:tokenizers/spm16k/tokenizer.model --spm_vocab_size=16000

Tokenizes the source's train and validation splits into token files (chunks written by every process on
all its cores: data.prepare_workers), with a progress bar of documents, MB/s, tokens/s and the time
left; a preparation that was stopped resumes from its finished chunks. The tokenizer is built once
(training a SentencePiece model on the training split when `--spm_vocab_size` is given and the model
does not exist yet) and kept in TOKENS_DIR/tokenizer. A run with the same data settings and
`--config.data.tokens_dir` (a shared folder or a gs:// bucket) reads these files instead of
tokenizing again. Prints documents, characters, tokens and tokens per character of each split.
"""

import shutil
import sys
import tempfile
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from lightjax.runtime.cli import define_distributed_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/baseline.py", "Run config file.", lock_config=True)
_SPM_VOCAB = flags.DEFINE_integer("spm_vocab_size", 0, "Train the spm:PATH tokenizer with this many pieces "
                                  "if PATH does not exist yet.")
_START_DISTRIBUTED = define_distributed_flags()


def _train_spm(data, target: Path, vocab_size: int) -> None:
    from lightjax.data.sources import load_split
    from lightjax.data.text import pieces
    from lightjax.data.tokenizers import train_sentencepiece

    docs = load_split(data, "train")
    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / "train.txt"
        with open(train_file, "w") as f:
            for i in range(len(docs)):
                f.writelines(pieces(docs[i]))
                f.write("\n")
        train_sentencepiece([train_file], Path(tmp) / "spm", vocab_size)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / "spm.model", target)


def main(argv):
    del argv
    from lightjax.runtime.distributed import DistributedError, exit_with_error, run_once

    try:
        _START_DISTRIBUTED()
    except DistributedError as e:
        sys.exit(f"prepare_data: {e}")
    from etils import epath

    from lightjax.data.prepare import prepare_splits, prepare_tokenizer
    from lightjax.data.tokens import read_meta, text_units
    from lightjax.runtime.distributed import print_once

    config = _CONFIG.value
    data = config.data
    if not data.tokens_dir:
        sys.exit("prepare_data: set --config.data.tokens_dir=DIR, where the token files go (a local folder, a shared "
                 "one or gs://); a run with the same setting reads them.")
    spec = data.tokenizer
    try:
        if spec.startswith("spm:") and not Path(spec[4:]).exists() and _SPM_VOCAB.value:
            run_once("training the SentencePiece model", lambda: _train_spm(data, Path(spec[4:]), _SPM_VOCAB.value))
        directory = epath.Path(data.tokens_dir)
        tokenizer = prepare_tokenizer(config, directory)
        print_once(f"source {data.source}, tokenizer {spec} ({tokenizer.vocab_size} tokens), seq_len {data.seq_len}")
        splits = prepare_splits(config, directory, directory / "tokenizer", progress=config.logging.progress)
    except (OSError, ValueError, KeyError, DistributedError) as e:
        exit_with_error(f"prepare_data: {e}")
    for split, path in splits.paths.items():
        meta = read_meta(path)
        count = (meta["examples"], "examples") if "examples" in meta else (meta["documents"], "documents")
        print_once(f"  {split:10s} {count[0]:>11,} {count[1]:9s} {meta['characters']:>14,} characters "
                   f"{meta['tokens']:>14,} tokens  {text_units(meta)['tokens_per_char']:.4f} tokens/char  {path}")
    print_once(f"Train on them with --config.data.tokens_dir={data.tokens_dir} (and the same data settings).")


if __name__ == "__main__":
    from lightjax.runtime.cli import run_script

    run_script(main, "prepare_data")
