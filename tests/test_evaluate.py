"""Evaluation against numpy: the loss over exactly the real targets of a padded split, perplexity,
bits per character and per byte."""

import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from lightjax.data.rows import TokenRows
from lightjax.data.text import TextFile
from lightjax.data.tokenizers import ByteTokenizer
from lightjax.data.tokens import text_units, write_token_file
from lightjax.train.evaluate import evaluate
from lightjax.train.run import build_run
from tests.helpers import tiny_run_config


def test_evaluation_equals_numpy_on_a_padded_split():
    config = tiny_run_config()  # seq_len 16, global batch 8
    config.train.eval_batches = 0
    training = build_run(config, jax.devices()[:1])
    params = training.init_state().params
    tokens = np.random.default_rng(0).integers(0, 96, 100).astype(np.int32)  # 99 targets: 6 full rows + 3
    got = evaluate(training, params, TokenRows(tokens, 16, pad_last=True), config, tokens_per_char=0.5)

    rows = np.zeros((8, 17), np.int32)  # one batch: 7 rows of the split, then a padding row
    for r in range(7):
        piece = tokens[r * 16: r * 16 + 17]
        rows[r, : len(piece)] = piece
    logits = np.asarray(training.model.apply({"params": nn.unbox(params)}, rows[:, :-1]), np.float64)
    logits = logits[..., :96]  # the padded vocabulary rows are never targets
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = [-logp[r, i, rows[r, i + 1]] for r in range(7) for i in range(16) if r * 16 + i + 1 < len(tokens)]
    assert len(nll) == 99 and got["val_tokens"] == 99
    loss = float(np.mean(nll))
    assert got["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert got["val_ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert got["val_bpc"] == pytest.approx(loss / math.log(2) * 0.5, rel=1e-5)


def test_units_count_characters_and_utf8_bytes(tmp_path):
    (tmp_path / "doc.txt").write_text("héllo wörld")  # 11 characters, 13 bytes
    meta = write_token_file(["abc", TextFile(tmp_path / "doc.txt")], ByteTokenizer(), tmp_path / "x.tokens")
    assert meta["tokens"] == 18  # 3 + 13 bytes, an EOS after each document
    assert text_units(meta) == {"tokens_per_char": 18 / 14, "tokens_per_byte": 18 / 16}
