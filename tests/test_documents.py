"""Packed rows that never attend across documents: each row carries its documents' segment ids and positions
(data/rows.py), attention stays inside a segment and RoPE restarts at 0 for each, so a document packed with
others gets the logits it gets alone. A run with document masks resumes exactly and trains alike on any mesh."""

import json

import jax
import numpy as np
import pytest

from lightjax.data.examples import ExampleRows, write_examples
from lightjax.data.prompts import PromptStyle
from lightjax.data.records import Record
from lightjax.data.rows import TokenRows, open_rows
from lightjax.data.tokenizers import ByteTokenizer
from lightjax.data.tokens import write_token_file
from lightjax.model.gpt import GPT
from lightjax.train.trainer import train
from tests.helpers import tiny_config
from tests.runs import assert_same_run, losses, run_config

DOCS = [np.array([5, 7, 9, 11, 2]), np.array([3, 4, 6]), np.array([8, 9, 10, 12, 13, 14, 15])]


def _packed(docs):
    tokens = np.concatenate(docs)[None]
    segments = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)])[None]
    positions = np.concatenate([np.arange(len(d)) for d in docs])[None]
    return tokens, positions, segments


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("scan", [False, True])
def test_a_packed_row_gives_each_document_its_own_logits(scan, window):
    cfg = tiny_config(sliding_window_size=window)
    model = GPT(cfg, scan_layers=scan)
    tokens, positions, segments = _packed(DOCS)
    variables = model.init(jax.random.key(0), tokens)
    packed = np.asarray(model.apply(variables, tokens, positions, segment_ids=segments))
    alone = np.concatenate([np.asarray(model.apply(variables, d[None])) for d in DOCS], axis=1)
    np.testing.assert_allclose(packed, alone, atol=1e-5, rtol=0)


def test_token_rows_carry_segments_and_positions_from_the_documents(tmp_path):
    texts = ["abcd", "ef", "ghijklmnopq"]  # byte tokens, EOS after each: 5, 3, 12 tokens
    write_token_file(texts, ByteTokenizer(), tmp_path / "train.tokens")
    rows = open_rows(tmp_path / "train.tokens", seq_len=6, training=True, document_mask=True)
    first, second = rows[0], rows[1]  # tokens 0..6 and 6..12: the second starts inside "ef"+EOS
    np.testing.assert_array_equal(first["segment_ids"], [1, 1, 1, 1, 1, 2])
    np.testing.assert_array_equal(first["positions"], [0, 1, 2, 3, 4, 0])
    np.testing.assert_array_equal(second["segment_ids"], [1, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(second["positions"], [0, 1, 0, 1, 2, 3])  # counted from the row's start
    assert "segment_ids" not in open_rows(tmp_path / "train.tokens", 6, training=True)[0]  # document_mask=False
    last = open_rows(tmp_path / "train.tokens", seq_len=6, training=False, document_mask=True)[3]  # padded
    np.testing.assert_array_equal(last["segment_ids"], [1, 0, 0, 0, 0, 0])
    one_document = TokenRows(np.arange(20, dtype=np.int32), 6, document_mask=True)
    assert "segment_ids" not in one_document[2]  # nothing to mask: a plain row
    two = TokenRows(np.arange(20, dtype=np.int32), 6, document_mask=True, starts=np.array([0, 8]))
    np.testing.assert_array_equal(two[1]["segment_ids"], [1, 1, 2, 2, 2, 2])


def test_a_packed_instruction_row_gives_each_example_its_own_logits(tmp_path):
    records = [Record(instruction="Add 2 and 3.", output="5"), Record(instruction="Say hi.", output="hi"),
               Record(instruction="Name a color.", output="red")]
    tokenizer = ByteTokenizer()
    write_examples(records, PromptStyle("alpaca"), tokenizer, tmp_path / "train.examples.npz")
    rows = ExampleRows(tmp_path / "train.examples.npz", seq_len=1023, pack=True, document_mask=True)
    assert len(rows) == 1  # the three examples in one row
    row, n = rows[0], int(rows.ends[-1])
    examples = [rows.tokens[s:e] for s, e in zip(rows.starts, rows.ends, strict=True)]
    # One segment per example, positions restarting at 0 for each (RoPE is relative, so the logits below
    # would not notice positions that ran on: this does).
    segments = np.concatenate([[k + 1] * len(e) for k, e in enumerate(examples)])
    np.testing.assert_array_equal(row["segment_ids"][:n], segments)
    np.testing.assert_array_equal(row["positions"][:n], np.concatenate([np.arange(len(e)) for e in examples]))
    model = GPT(tiny_config(vocab_size=tokenizer.vocab_size, block_size=1024))
    inputs = row["tokens"][None, :-1]
    variables = model.init(jax.random.key(0), inputs)
    packed = np.asarray(model.apply(variables, inputs, row["positions"][None], segment_ids=row["segment_ids"][None]))
    alone = np.concatenate([np.asarray(model.apply(variables, e[None])) for e in examples], axis=1)
    np.testing.assert_allclose(packed[:, :n], alone[:, :n], atol=1e-5, rtol=0)


def _corpus(tmp_path):
    """A text: corpus of many short documents, so that rows of 32 tokens hold several."""
    rng = np.random.default_rng(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis", "nobler"]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, rng.integers(2, 9)))}) + "\n"
                            for _ in range(400)))
    return path


def _document_run(tmp_path, mesh, **train_kw):
    c = run_config(tmp_path, **train_kw)
    c.data.source, c.data.local_path, c.data.tokenizer = f"text:{_corpus(tmp_path)}", "", "byte"
    c.model.vocab_size = 257
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    assert c.data.document_mask  # the default
    return c


def test_a_document_masked_run_resumes_exactly_and_trains_alike_on_any_mesh(tmp_path):
    train(_document_run(tmp_path, (8, 1, 1)), tmp_path / "full")
    train(_document_run(tmp_path, (8, 1, 1), stop_after=6), tmp_path / "resumed")
    train(_document_run(tmp_path, (8, 1, 1)), tmp_path / "resumed")
    assert_same_run(tmp_path / "full", tmp_path / "resumed")
    train(_document_run(tmp_path, (2, 2, 2)), tmp_path / "mesh")
    full, mesh = losses(tmp_path / "full"), losses(tmp_path / "mesh")
    np.testing.assert_allclose([mesh[k] for k in sorted(mesh)], [full[k] for k in sorted(full)], atol=1e-5)


def test_mfu_counts_causal_attention_and_the_keys_documents_allow():
    """Attention FLOPs per token: the full square counts T keys per query, causal attention (T + 1) / 2,
    and with document masks the train step measures the keys the segments allow."""
    from lightjax.model.flops import causal_keys, flops_per_token
    from lightjax.train.run import build_run
    from tests.helpers import tiny_run_config

    cfg = tiny_config()
    attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_size
    assert flops_per_token(cfg, 8) - flops_per_token(cfg, 8, causal_keys(8)) == attention * (8 - 4.5)
    run = build_run(tiny_run_config(), jax.devices()[:1])
    segments = np.array([[1, 1, 1, 2, 2, 2, 2, 2] * 2] * 8)  # documents of 3 and 5 tokens
    positions = np.array([[0, 1, 2, 0, 1, 2, 3, 4] * 2] * 8)
    batch = {"tokens": np.ones((8, 17), np.int32), "mask": np.ones((8, 16), np.int32), "segment_ids": segments,
             "positions": positions}
    _, metrics = run.train_step(run.init_state(), batch)
    assert float(metrics["attended_keys"]) == (1 + 2 + 3 + 1 + 2 + 3 + 4 + 5) / 8  # 2.625 of causal's 8.5
