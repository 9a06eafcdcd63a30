"""The baseline with a SentencePiece tokenizer (16,000 pieces trained on the Tiny
Shakespeare training split) instead of characters. Its loss is per token, so compare runs across
tokenizers by the validation bits per character (`val_bpc` in metrics.jsonl).

Train the tokenizer first (once), then train:
    python scripts/prepare_data.py --config configs/baseline_spm.py --spm_vocab_size=16000
    python scripts/train.py --config configs/baseline_spm.py
"""

from lightjax.train.config import default_config


def get_config():
    c = default_config()  # the baseline's settings (configs/baseline.py)
    c.data.tokenizer = "spm:tokenizers/shakespeare_spm16k/tokenizer.model"
    c.model.vocab_size = 16000
    return c
