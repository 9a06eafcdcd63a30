"""Sources and Grain pipelines: Tiny Shakespeare via our TFDS builder, packing, resume, shards, errors."""

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lightjax.data.pipeline import check_vocab, eval_batches, shard_documents, train_iterator
from lightjax.data.sources import load_split, split_documents
from lightjax.data.tokenizers import ByteTokenizer, CharTokenizer
from lightjax.run_config import default_config

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def _data_config(tmp_path, **kw):
    data = default_config().data
    data.local_path, data.data_dir = str(SHAKESPEARE), str(tmp_path / "tfds")
    for k, v in kw.items():
        setattr(data, k, v)
    return data


@pytest.fixture(scope="module")
def corpus():
    """A small corpus of documents of varied lengths (lengths chosen so packing rows straddle them)."""
    rng = np.random.default_rng(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog"]
    return [" ".join(rng.choice(words, rng.integers(1, 30))) for _ in range(40)]


def test_tiny_shakespeare_tfds_builder(tmp_path):
    data = _data_config(tmp_path)
    train, val = load_split(data, "train"), load_split(data, "validation")
    assert (len(train), len(val)) == (1, 1)
    assert (len(train[0]), len(val[0])) == (1_003_854, 55_770)
    assert list((tmp_path / "tfds").rglob("*.array_record*"))  # prepared as ArrayRecord, no TensorFlow
    assert CharTokenizer.from_text(train[0]).vocab_size == 65


def test_packing_loses_and_duplicates_nothing(corpus):
    tok, seq_len = ByteTokenizer(), 16
    it = train_iterator(corpus, tok, seq_len, batch_size=4, seed=1, shuffle_window=0)
    epoch_tokens = sum(len(d.encode()) + 1 for d in corpus)  # + EOS per document
    rows = []
    while len(rows) * (seq_len + 1) < epoch_tokens:
        batch = next(it)
        assert batch["tokens"].shape == (4, seq_len + 1) and batch["tokens"].dtype == np.int32
        rows.extend(batch["tokens"])
    stream = np.concatenate(rows)[:epoch_tokens]  # the first epoch, in its shuffled document order
    want = Counter(np.concatenate([tok.encode(d) for d in corpus]).tolist()) + Counter({tok.eos_id: len(corpus)})
    assert Counter(stream.tolist()) == want
    # Every document is there whole, and each ends with EOS.
    assert stream[-1] == tok.eos_id
    docs = [tok.decode(piece) for piece in np.split(stream, np.flatnonzero(stream == tok.eos_id) + 1)[:-1]]
    assert sorted(docs) == sorted(corpus)


def test_window_shuffle_permutes_rows_without_loss(corpus):
    tok, seq_len, window = ByteTokenizer(), 8, 12
    plain = train_iterator(corpus, tok, seq_len, batch_size=4, seed=1, shuffle_window=0)
    shuffled = train_iterator(corpus, tok, seq_len, batch_size=4, seed=1, shuffle_window=window)
    a = [tuple(r) for _ in range(3) for r in next(plain)["tokens"]]
    b = [tuple(r) for _ in range(3) for r in next(shuffled)["tokens"]]
    assert sorted(a) == sorted(b) and a != b  # the same 12 rows, another order


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_same_next_batches(corpus, workers):
    def make():
        return train_iterator(corpus, ByteTokenizer(), 16, batch_size=4, seed=3, num_workers=workers,
                              shuffle_window=10)

    it = make()
    for _ in range(7):
        next(it)
    state = it.get_state()
    want = [np.asarray(next(it)["tokens"]) for _ in range(5)]
    restored = make()
    restored.set_state(state)
    got = [np.asarray(next(restored)["tokens"]) for _ in range(5)]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    for i in (it, restored):
        if hasattr(i, "close"):
            i.close()


def test_process_shards_are_disjoint_and_cover_the_split(corpus):
    shards = [list(shard_documents(corpus, (p, 2))) for p in (0, 1)]
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == sorted(corpus)
    single = ["abcdefghij" * 7]  # one document (Tiny Shakespeare): cut into contiguous pieces
    pieces = [list(shard_documents(single, (p, 2))) for p in (0, 1)]
    assert pieces[0][0] + pieces[1][0] == single[0] and len(pieces[0]) == len(pieces[1]) == 1


def test_same_seed_same_order_other_seed_other_order(corpus):
    first = lambda seed: next(train_iterator(corpus, ByteTokenizer(), 16, 4, seed))["tokens"]  # noqa: E731
    np.testing.assert_array_equal(first(5), first(5))
    assert not np.array_equal(first(5), first(6))


def test_eval_covers_the_split_once_and_masks_padding():
    tok = ByteTokenizer()
    docs = ["x" * 50, "y" * 30]  # 82 tokens with EOS: 81 targets
    batches = list(eval_batches(docs, tok, seq_len=10, batch_size=4))
    assert len(batches) == 3  # 9 rows of 10 targets, in batches of 4: the last batch is padded
    assert sum(int(b["mask"].sum()) for b in batches) == 81
    targets = np.concatenate([b["tokens"][:, 1:][b["mask"] == 1] for b in batches])
    np.testing.assert_array_equal(targets, np.concatenate([tok.encode(d + "") for d in ["x" * 50]] + [[256]]
                                                          + [tok.encode("y" * 30), [256]])[1:])
    # Two processes: the same number of batches each, together the same targets.
    per_process = [list(eval_batches(docs, tok, 10, 2, shard=(p, 2))) for p in (0, 1)]
    assert len(per_process[0]) == len(per_process[1])
    assert sum(int(b["mask"].sum()) for batches in per_process for b in batches) == 81


def test_text_source_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.jsonl").write_text('{"text": "second"}\n{"text": "third"}\n\n{"text": "fourth"}\n')
    data = _data_config(tmp_path, source=f"text:{tmp_path}/*", val_fraction=0.25)
    assert list(load_split(data, "train")) == ["first document", "second", "third"]
    assert list(load_split(data, "validation")) == ["fourth"]
    assert split_documents(["abcdefghij"], 0.2) == {"train": ["abcdefgh"], "validation": ["ij"]}


def test_bad_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config.data.source='text:/nowhere/\*.txt' matches no file"):
        load_split(_data_config(tmp_path, source="text:/nowhere/*.txt"), "train")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"the corpus is empty \(1 files, no text\)"):
        load_split(_data_config(tmp_path, source=f"text:{tmp_path}/empty.txt"), "train")
    (tmp_path / "bad.txt").write_bytes(b"good text \xff\xfe more")
    with pytest.raises(ValueError, match=r"bad.txt is not valid UTF-8 at byte offset 10"):
        load_split(_data_config(tmp_path, source=f"text:{tmp_path}/bad.txt"), "train")
    with pytest.raises(FileNotFoundError, match=r"config.data.local_path='/missing/input.txt' does not exist"):
        load_split(_data_config(tmp_path, local_path="/missing/input.txt", data_dir=str(tmp_path / "d")), "train")
    with pytest.raises(ValueError, match=r"config.data.source='openwebtext' is not one of tiny_shakespeare, "
                                         r"tfds:NAME, text:GLOB"):
        load_split(_data_config(tmp_path, source="openwebtext"), "train")
    with pytest.raises(ValueError, match=r"config.data.seq_len=64 is longer than the validation split \(11 tokens\)"):
        next(eval_batches(["0123456789"], ByteTokenizer(), seq_len=64, batch_size=2))
    with pytest.raises(ValueError, match=r"tokenizer has 257 tokens but the model's vocab_size is 65; set "
                                         r"--config.model.vocab_size=257"):
        check_vocab(ByteTokenizer(), 65)


def test_tfds_source_reads_a_prepared_array_record_dataset(tmp_path):
    prepared = _data_config(tmp_path)
    load_split(prepared, "train")  # prepares lightjax_tiny_shakespeare into tmp_path/tfds
    data = _data_config(tmp_path, source="tfds:lightjax_tiny_shakespeare")
    val = load_split(data, "validation")
    assert len(val) == 1 and len(val[0]) == 55_770
    with pytest.raises(KeyError, match=r"record 0 has no field 'content' \(fields: \['text'\]\)"):
        load_split(_data_config(tmp_path, source="tfds:lightjax_tiny_shakespeare", text_field="content"),
                   "train")[0]


def test_pipeline_batch_becomes_a_global_array_split_over_the_batch_axes(corpus):
    from lightjax.sharding import make_mesh, shard_batch

    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    batch = shard_batch(next(train_iterator(corpus, ByteTokenizer(), 16, batch_size=8, seed=0)), mesh)
    tokens = batch["tokens"]
    assert tokens.shape == (8, 17) and len(tokens.addressable_shards) == 8
    assert {s.data.shape for s in tokens.addressable_shards} == {(1, 17)}


def test_prepare_data_script(tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(root)
    args = [sys.executable, "scripts/prepare_data.py", "--config", "configs/baseline.py",
            f"--config.data.local_path={SHAKESPEARE}", f"--config.data.data_dir={tmp_path}"]
    out = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"train\s+1 documents\s+1,003,854 characters\s+1,003,854 tokens", out.stdout)
    assert re.search(r"validation\s+1 documents\s+55,770 characters\s+55,770 tokens", out.stdout)
    bad = subprocess.run(args[:-2] + ["--config.data.local_path=/missing.txt", f"--config.data.data_dir={tmp_path}/x"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("prepare_data: config.data.local_path='/missing.txt' does")
