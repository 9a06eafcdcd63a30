"""Sources and Grain pipelines: Tiny Shakespeare via our TFDS builder, token files, the global batch order,
resume at a step, process slices, errors."""

import re
from pathlib import Path

import numpy as np
import pytest

from lightjax.data.pipeline import eval_batches, train_iterator
from lightjax.data.rows import TokenRows
from lightjax.data.sources import load_split, split_documents
from lightjax.data.tokenizers import ByteTokenizer, CharTokenizer, check_vocab, make_tokenizer
from lightjax.data.tokens import open_tokens, read_meta, token_stream, write_token_file
from lightjax.train.config import default_config
from tests.helpers import SHAKESPEARE, script_env

pytestmark = pytest.mark.shakespeare  # reads the local Tiny Shakespeare copy



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


def _rows(corpus, seq_len=16):
    return TokenRows(token_stream(corpus, ByteTokenizer()), seq_len)


def _take(it, n):
    return [np.asarray(next(it)["tokens"]) for _ in range(n)]


def test_an_epoch_holds_every_row_once_and_the_next_epoch_reorders_them(corpus):
    tok, seq_len = ByteTokenizer(), 16
    stream = token_stream(corpus, tok)
    assert len(stream) == sum(len(d.encode()) + 1 for d in corpus)  # + EOS per document
    rows = TokenRows(stream, seq_len)
    assert len(rows) == (len(stream) - 1) // seq_len
    # Rows overlap by one token: together they are the stream, every token a target once.
    np.testing.assert_array_equal(np.concatenate([rows[i]["tokens"][:-1] for i in range(len(rows))]),
                                  stream[: len(rows) * seq_len])
    batch = 4
    batches = _take(train_iterator(rows, batch, seed=1), -(-2 * len(rows) // batch))
    assert batches[0].shape == (batch, seq_len + 1) and batches[0].dtype == np.int32
    flat = [tuple(r) for b in batches for r in b]
    first, second = flat[: len(rows)], flat[len(rows): 2 * len(rows)]
    every_row = sorted(tuple(rows[i]["tokens"]) for i in range(len(rows)))
    assert sorted(first) == every_row and sorted(second) == every_row
    assert first != second and first != [tuple(rows[i]["tokens"]) for i in range(len(rows))]  # shuffled, anew per epoch


@pytest.mark.parametrize("processes", [2, 4])
def test_global_batches_do_not_depend_on_the_process_count(corpus, processes):
    rows, batch = _rows(corpus), 8
    one = _take(train_iterator(rows, batch, seed=3, shard=(0, 1)), 6)
    slices = [_take(train_iterator(rows, batch, seed=3, shard=(p, processes)), 6) for p in range(processes)]
    for s in range(6):
        assert all(slices[p][s].shape == (batch // processes, 17) for p in range(processes))
        np.testing.assert_array_equal(np.concatenate([slices[p][s] for p in range(processes)]), one[s])


def test_a_process_reads_only_its_own_rows():
    read = []

    class Labelled(TokenRows):  # row i is all i: a batch shows which rows it holds
        def __getitem__(self, i):
            return {"tokens": np.full(17, i, np.int32), "mask": np.ones(16, np.int32)}

    class Recording(Labelled):
        def __getitem__(self, i):
            read.append(i)
            return super().__getitem__(i)

    tokens = np.zeros(16 * 100_000 + 1, np.int32)  # an epoch far longer than what is read
    global_batches = _take(train_iterator(Labelled(tokens, 16), 8, seed=3), 1000)
    got = _take(train_iterator(Recording(tokens, 16), 8, seed=3, shard=(1, 4)), 3)
    for s in range(3):
        np.testing.assert_array_equal(got[s], global_batches[s][2:4])
    own = {int(i) for b in global_batches for i in b[2:4, 0]}
    assert read and set(read) <= own  # Grain reads ahead, but only this process's rows of later steps


@pytest.mark.parametrize("workers", [0, 2])
def test_starting_at_a_step_continues_the_same_batches(corpus, workers):
    rows = _rows(corpus)
    want = _take(train_iterator(rows, 4, seed=3), 12)[7:]
    it = train_iterator(rows, 4, seed=3, num_workers=workers, start_step=7)
    got = _take(it, 5)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    if hasattr(it, "close"):
        it.close()
    # Resumed on 2 processes, process 1 continues with its half of the same batches.
    half = _take(train_iterator(rows, 4, seed=3, shard=(1, 2), start_step=7), 5)
    for a, b in zip(half, want, strict=True):
        np.testing.assert_array_equal(a, b[2:])


def test_token_file_round_trip_and_rows_from_it(corpus, tmp_path):
    import pickle

    tok = ByteTokenizer()
    meta = write_token_file(corpus, tok, tmp_path / "data" / "train.tokens", {"source": "test"})
    stream = token_stream(corpus, tok)
    assert meta == {"tokens": len(stream), "dtype": "uint16", "documents": len(corpus),
                    "characters": sum(map(len, corpus)), "bytes": sum(len(d.encode()) for d in corpus),
                    "source": "test"}
    assert read_meta(tmp_path / "data" / "train.tokens") == meta
    assert (tmp_path / "data" / "train.tokens").stat().st_size == 2 * len(stream)
    assert not list((tmp_path / "data").glob("*.partial*"))
    rows = TokenRows(str(tmp_path / "data" / "train.tokens"), 16)
    copy = pickle.loads(pickle.dumps(rows))  # what Grain workers receive: the path, not the tokens
    assert len(pickle.dumps(rows)) < 1000
    for i in (0, 5, len(rows) - 1):
        np.testing.assert_array_equal(copy[i]["tokens"], stream[i * 16: i * 16 + 17])
    with pytest.raises(FileNotFoundError, match="not a complete token file"):
        TokenRows(str(tmp_path / "missing.tokens"), 16)
    with pytest.raises(ValueError, match=r"config.data.seq_len=100000 is longer than the training split"):
        TokenRows(stream, 100_000)


def test_same_seed_same_order_other_seed_other_order(corpus):
    rows = _rows(corpus)
    first = lambda seed: next(train_iterator(rows, 4, seed))["tokens"]  # noqa: E731
    np.testing.assert_array_equal(first(5), first(5))
    assert not np.array_equal(first(5), first(6))
    with pytest.raises(ValueError, match=r"global_batch_size=6 must be divisible by the number of processes \(4\)"):
        train_iterator(rows, 6, 5, shard=(0, 4))


def test_eval_covers_the_split_once_and_masks_padding():
    tok = ByteTokenizer()
    docs = ["x" * 50, "y" * 30]  # 82 tokens with EOS: 81 targets
    batches = list(eval_batches(TokenRows(token_stream(docs, tok), 10, pad_last=True), batch_size=4))
    assert len(batches) == 3  # 9 rows of 10 targets, in batches of 4: the last batch is padded
    assert sum(int(b["mask"].sum()) for b in batches) == 81
    targets = np.concatenate([b["tokens"][:, 1:][b["mask"] == 1] for b in batches])
    np.testing.assert_array_equal(targets, np.concatenate([tok.encode(d + "") for d in ["x" * 50]] + [[256]]
                                                          + [tok.encode("y" * 30), [256]])[1:])
    # Two processes: the same number of batches each, together the same targets.
    per_process = [list(eval_batches(TokenRows(token_stream(docs, tok), 10, pad_last=True), 2, shard=(p, 2)))
                   for p in (0, 1)]
    assert len(per_process[0]) == len(per_process[1])
    assert sum(int(b["mask"].sum()) for batches in per_process for b in batches) == 81


def test_text_source_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.jsonl").write_text('{"text": "second"}\n{"text": "third"}\n\n{"text": "fourth"}\n')
    data = _data_config(tmp_path, source=f"text:{tmp_path}/*", val_fraction=0.25)
    assert [str(d) for d in load_split(data, "train")] == ["first document", "second", "third"]
    assert list(load_split(data, "validation")) == ["fourth"]
    assert split_documents(["abcdefghij"], 0.2) == {"train": ["abcdefgh"], "validation": ["ij"]}
    # Documents are read when asked for: a bad line is named when it is reached, with its file and line.
    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n{"text": 7}\n{"text": oops}\n{"other": "x"}\n')
    docs = load_split(_data_config(tmp_path, source=f"text:{tmp_path}/c.jsonl", val_fraction=0.25), "train")
    assert len(docs) == 3 and docs[0] == "fine"
    with pytest.raises(ValueError, match=r"c.jsonl:2: field 'text' is a int, not text"):
        docs[1]
    with pytest.raises(ValueError, match=r"c.jsonl:3 is not valid JSON"):
        docs[2]
    with pytest.raises(ValueError, match=r"c.jsonl:4 has no field 'text'; set config.data.text_field"):
        load_split(_data_config(tmp_path, source=f"text:{tmp_path}/c.jsonl", val_fraction=0.25), "validation")[0]


def test_a_long_document_is_tokenized_in_bounded_memory(tmp_path):
    """A 24 MB one-line .txt file: its tokens equal the whole text's, and the preparation holds about
    60 MB at most, what one 1M-character piece costs the char tokenizer (the document's tokens alone
    are 96 MB as int32; before pieces, this took 580 MB)."""
    import tracemalloc

    line = "".join(chr(97 + i % 26) + (" " if i % 7 == 0 else "") for i in range(1000))
    (tmp_path / "long.txt").write_text(line * (24_000_000 // len(line)))
    data = _data_config(tmp_path, source=f"text:{tmp_path}/long.txt", tokenizer="char", val_fraction=0.01)
    tracemalloc.start()
    docs = load_split(data, "train")
    tokenizer = make_tokenizer("char", docs)
    meta = write_token_file(docs, tokenizer, tmp_path / "train.tokens")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 80e6, f"{peak / 1e6:.0f} MB"
    text = (tmp_path / "long.txt").read_text()
    cut = int(len(text) * 0.99)
    assert meta["characters"] == cut and meta["tokens"] == cut  # no EOS: the char tokenizer has none
    assert np.array_equal(np.asarray(open_tokens(tmp_path / "train.tokens")), tokenizer.encode(text[:cut]))


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
        next(eval_batches(TokenRows(token_stream(["0123456789"], ByteTokenizer()), 64, pad_last=True), batch_size=2))
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
    from lightjax.runtime.sharding import make_mesh, shard_batch

    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    batch = shard_batch(next(train_iterator(_rows(corpus), 8, seed=0)), mesh)
    tokens = batch["tokens"]
    assert tokens.shape == (8, 17) and len(tokens.addressable_shards) == 8
    assert {s.data.shape for s in tokens.addressable_shards} == {(1, 17)}


def test_prepare_data_script(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = script_env(root)
    args = [sys.executable, "scripts/prepare_data.py", "--config", "configs/baseline.py",
            f"--config.data.tokens_dir={tmp_path}/tokens", f"--config.data.local_path={SHAKESPEARE}",
            f"--config.data.data_dir={tmp_path}"]
    out = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert read_meta(tmp_path / "tokens" / "train.tokens")["tokens"] == 1_003_854
    assert re.search(r"train\s+1 documents\s+1,003,854 characters\s+1,003,854 tokens", out.stdout)
    assert re.search(r"validation\s+1 documents\s+55,770 characters\s+55,770 tokens", out.stdout)
    bad = subprocess.run(args[:-2] + ["--config.data.local_path=/missing.txt", f"--config.data.data_dir={tmp_path}/x"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("prepare_data: config.data.local_path='/missing.txt' does")
    nowhere = subprocess.run(args[:4], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert nowhere.stderr.strip() == ("prepare_data: set --config.data.tokens_dir=DIR, where the token files go (a "
                                      "local folder, a shared one or gs://); a run with the same setting reads them.")
