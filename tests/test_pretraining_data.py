"""Data for pretraining: Parquet, Hugging Face datasets and compressed JSONL sources; token files written in
chunks by every process and worker (the same files and batches as one writer, resumable after a kill);
weighted mixtures with schedules, exact across process counts, with per-source validation losses."""

import gzip
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from ml_collections import ConfigDict

from lightjax.data.chunks import join_chunks, split_chunks, worker_pool, write_chunks
from lightjax.data.mixture import MixedRows, interleave, interleave_counts, parse_mixture
from lightjax.data.pipeline import train_dataset
from lightjax.data.prepare import write_split
from lightjax.data.rows import TokenRows
from lightjax.data.sources import load_split
from lightjax.data.tokenizers import ByteTokenizer
from lightjax.data.tokens import open_document_starts, open_tokens, read_meta, write_token_file
from lightjax.train.config import default_config
from tests.helpers import ROOT, script_env

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "ünïcode", "日本語"]


def documents(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(0, 40))) for _ in range(n)]


def data_config(source, **overrides):
    d = default_config().data
    d.source = source
    for k, v in overrides.items():
        d[k] = v
    return d


def read_all(data, split):
    docs = load_split(data, split)
    return [str(docs[i]) for i in range(len(docs))]


def test_parquet_datasets_and_compressed_jsonl_read_the_same_documents(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = documents(500)
    pq.write_table(pa.table({"text": docs[:300], "id": list(range(300))}), tmp_path / "a.parquet", row_group_size=64)
    pq.write_table(pa.table({"text": docs[300:]}), tmp_path / "b.parquet", row_group_size=33)
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(tmp_path / "one")
    two = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[:450]}),
                                "validation": datasets.Dataset.from_dict({"text": docs[450:]})})
    two.save_to_disk(tmp_path / "two")
    for source in (f"parquet:{tmp_path}/*.parquet", f"text:{tmp_path}/c.jsonl.gz", f"text:{tmp_path}/d.jsonl.zst",
                   f"hf:{tmp_path}/one"):
        data = data_config(source)
        train, val = read_all(data, "train"), read_all(data, "validation")
        assert (train, val) == (docs[:475], docs[475:]), source  # the last val_fraction (5%) of the documents
    data = data_config(f"hf:{tmp_path}/two")
    assert (read_all(data, "train"), read_all(data, "validation")) == (docs[:450], docs[450:])  # its own split
    corpus = load_split(data_config(f"text:{tmp_path}/d.jsonl.zst"), "train")
    assert corpus[400] == docs[400] and corpus[3] == docs[3] and corpus[4] == docs[4]  # back, then forward again


def test_a_bad_record_is_named_by_file_and_row(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["fine", "also fine", None, "fine"]}), tmp_path / "x.parquet", row_group_size=2)
    docs = load_split(data_config(f"parquet:{tmp_path}/x.parquet", val_fraction=0.25), "train")
    with pytest.raises(ValueError, match=r"x\.parquet row 2: 'text' is empty \(null\)"):
        [docs[i] for i in range(len(docs))]
    with pytest.raises(ValueError, match=r"has no column 'body' \(columns: text\); set config.data.text_field"):
        load_split(data_config(f"parquet:{tmp_path}/x.parquet", text_field="body"), "train")
    (tmp_path / "y.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n\n{"text": 3}\n{"text": "b"}\n'))
    docs = load_split(data_config(f"text:{tmp_path}/y.jsonl.gz", val_fraction=0.3), "train")
    with pytest.raises(ValueError, match=r"y\.jsonl\.gz:3: field 'text' is a int, not text"):
        docs[1]
    datasets.Dataset.from_dict({"body": ["a", "b"]}).save_to_disk(tmp_path / "ds")
    with pytest.raises(ValueError, match=r"hf:.*ds\[train\] has no column 'text' \(columns: body\)"):
        load_split(data_config(f"hf:{tmp_path}/ds"), "train")


def test_chunks_written_by_any_number_of_processes_and_workers_equal_one_writer(tmp_path):
    docs = documents(300, seed=1) + [""] + documents(20, seed=2)  # an empty document holds only its EOS
    tokenizer = ByteTokenizer()
    tokenizer.save(tmp_path / "tok")
    one = write_token_file(docs, tokenizer, tmp_path / "one.tokens")
    ways = {"1 process": [(0, 1, 1)], "2 processes": [(1, 2, 1), (0, 2, 1)], "3 processes": [(2, 3, 1), (0, 3, 1),
                                                                                            (1, 3, 1)],
            "1 process, 2 workers": [(0, 1, 2)]}
    for way, shards in ways.items():
        path = tmp_path / way / "train.tokens"
        for index, count, workers in shards:
            with worker_pool(workers) as pool:
                write_chunks(docs, tmp_path / "tok", path, {"source": "test"}, (index, count), pool)
        meta = join_chunks(path, len(split_chunks(docs)), {"source": "test"})
        assert (meta["tokens"], meta["documents"], meta["bytes"]) == (one["tokens"], one["documents"], one["bytes"])
        want = open_tokens(tmp_path / "one.tokens")[0:one["tokens"]]
        assert np.array_equal(open_tokens(path)[0:meta["tokens"]], want)
        assert np.array_equal(open_document_starts(path), open_document_starts(tmp_path / "one.tokens")), way
        a = TokenRows(path, 16, document_mask=True)
        b = TokenRows(tmp_path / "one.tokens", 16, document_mask=True)
        for i in (0, 1, 77, len(a) - 1):  # rows across chunk boundaries too
            assert all(np.array_equal(a[i][k], b[i][k]) for k in b[i]), (way, i)
        batches = [train_dataset(a, 8, seed=3, shard=(p, 2)) for p in range(2)]
        first = [next(iter(ds))["tokens"] for ds in batches]
        want = next(iter(train_dataset(b, 8, seed=3, shard=(0, 1))))["tokens"]
        assert np.array_equal(np.concatenate(first), want)


def test_a_streamed_dataset_is_tokenized_file_by_file_with_its_last_files_held_out(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = documents(90, seed=4)
    (tmp_path / "pq").mkdir()
    for f in range(3):  # a dataset of data files, as a Hub repository's download is
        pq.write_table(pa.table({"text": docs[f * 30:(f + 1) * 30]}), tmp_path / "pq" / f"part-{f}.parquet",
                       row_group_size=7)
    tokenizer = ByteTokenizer()
    tokenizer.save(tmp_path / "tok")
    data = data_config(f"hf:{tmp_path / 'pq'}", hf_streaming=True)
    for split, want in (("train", docs[:60]), ("validation", docs[60:])):
        meta = write_split(data, split, tmp_path / "tok", tmp_path / f"{split}.tokens", workers=2)
        one = write_token_file(want, tokenizer, tmp_path / f"{split}-one.tokens")
        assert meta["chunks"] == [write_token_file(want[i:i + 30], tokenizer, tmp_path / "c.tokens")["tokens"]
                                  for i in range(0, len(want), 30)]
        assert np.array_equal(open_tokens(tmp_path / f"{split}.tokens")[0:meta["tokens"]],
                              open_tokens(tmp_path / f"{split}-one.tokens")[0:one["tokens"]])
        assert np.array_equal(open_document_starts(tmp_path / f"{split}.tokens"),
                              open_document_starts(tmp_path / f"{split}-one.tokens"))
    (tmp_path / "pq" / "part-1.parquet").unlink()
    (tmp_path / "pq" / "part-2.parquet").unlink()
    with pytest.raises(ValueError, match=r"streams one file and has no 'validation' split: nothing to hold out"):
        load_split(data, "train")


def _corpus(tmp_path, files=12, size=120_000):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(files):
        words = rng.choice(WORDS, size // 6)
        (corpus / f"{i:03d}.txt").write_text(" ".join(words))
    return corpus


def _prepare(tokens_dir, corpus, *flags, processes=1, popen=False):
    args = ["scripts/prepare_data.py", "--config", "configs/smoke.py", f"--config.data.source=text:{corpus}/*.txt",
            "--config.data.tokenizer=byte", f"--config.data.tokens_dir={tokens_dir}", *flags]
    cmd = [sys.executable, *args] if processes == 1 else [
        sys.executable, "scripts/launch.py", f"--processes={processes}", "--devices_per_process=1", "--", *args]
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = subprocess.run(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


def _files(tokens_dir):
    """{relative path: bytes} of a tokens_dir's token, starts and chunk files (not metadata: it holds paths)."""
    return {str(p.relative_to(tokens_dir)): p.read_bytes() for p in sorted(tokens_dir.rglob("*"))
            if p.is_file() and p.suffix in (".tokens", ".starts")}


def test_two_processes_prepare_the_same_files_as_one_and_a_killed_preparation_resumes(tmp_path):
    corpus = _corpus(tmp_path)
    out = _prepare(tmp_path / "one", corpus)
    assert "Train on them with --config.data.tokens_dir=" in out
    assert "train               11 documents" in out.replace(",", "")
    two = _prepare(tmp_path / "two", corpus, processes=2)
    assert two.count("Prepared") == 2  # process 0 joins and reports each split once
    assert _files(tmp_path / "one") == _files(tmp_path / "two") and len(_files(tmp_path / "one")) == 2 * (11 + 1) + 2
    # Killed (SIGKILL) with some chunks finished, then run again: the same files, the finished chunks kept.
    proc = _prepare(tmp_path / "killed", corpus, "--config.data.prepare_workers=1", "--config.data.tokenizer=char",
                    popen=True)
    chunks = tmp_path / "killed" / "train.tokens.d"
    deadline = time.time() + 120
    while len(list(chunks.glob("*.tokens.json"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in chunks.glob("*.tokens")
                if (chunks / (p.name + ".json")).exists()}
    assert 3 <= len(finished) < 11 and read_meta(tmp_path / "killed" / "train.tokens") is None
    _prepare(tmp_path / "killed", corpus, "--config.data.tokenizer=char")
    _prepare(tmp_path / "clean", corpus, "--config.data.tokenizer=char")
    assert _files(tmp_path / "killed") == _files(tmp_path / "clean")
    assert {n: (chunks / n).stat().st_mtime_ns for n in finished} == finished  # not written again
    assert not list(chunks.glob(".*partial*"))


class ArrayRows:
    """Rows that say which source and row they are."""

    def __init__(self, source, n):
        self.source, self.n, self.seq_len, self.note = source, n, 4, ""

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"tokens": np.array([self.source, i, 0, 0, 0], np.int32), "mask": np.ones(4, np.int32)}

    def close(self):
        pass


def _mixture(weights, schedule=""):
    d = default_config().data
    d.mixture = {name: {"source": f"text:{name}/*.txt", "weight": w} for name, w in weights.items()}
    d.mixture_schedule = schedule
    return parse_mixture(d)


def test_interleave_is_exact_and_its_counts_only_grow():
    weights = (3, 5, 2)
    for n in range(200):
        counts = interleave_counts(n, weights)
        assert sum(counts) == n and all(abs(c - n * w / 10) <= 1 for c, w in zip(counts, weights, strict=True))
        nxt = interleave_counts(n + 1, weights)
        assert sorted(b - a for a, b in zip(counts, nxt, strict=True)) == [0, 0, 1]
        source, k = interleave(n, weights)
        assert nxt[source] == counts[source] + 1 and k == counts[source]


def test_a_mixtures_batches_follow_its_weights_and_its_schedule():
    mixture = _mixture({"a": 0.7, "b": 0.3}, "100:a=0.2,b=0.8")
    assert mixture.names == ("a", "b")
    assert mixture.weights_at(99) == (0.7, 0.3) and mixture.weights_at(100) == (0.2, 0.8)
    rows = MixedRows([ArrayRows(0, 50), ArrayRows(1, 37)], mixture, seed=0, global_batch=16)
    batches = [b["tokens"] for b in itertools.islice(train_dataset(rows, 16, seed=0, shard=(0, 1)), 200)]
    per_step = np.array([np.bincount(b[:, 0], minlength=2) for b in batches])
    np.testing.assert_allclose(per_step[:100].mean(0), [0.7 * 16, 0.3 * 16], atol=0.05)
    np.testing.assert_allclose(per_step[100:].mean(0), [0.2 * 16, 0.8 * 16], atol=0.05)
    assert np.all(np.abs(per_step[:100] - [11.2, 4.8]) <= 1)  # every batch in proportion, within a row
    seen = np.concatenate(batches[:100])
    a_rows = seen[seen[:, 0] == 0, 1]
    assert sorted(a_rows[:50]) == list(range(50)) and sorted(a_rows[50:100]) == list(range(50))  # epochs of source a
    assert not np.array_equal(a_rows[:50], a_rows[50:100])  # reshuffled each epoch
    every = np.concatenate(batches)
    b_rows = every[every[:, 0] == 1, 1]  # source b's order goes on across the schedule's change
    assert all(sorted(b_rows[e * 37:(e + 1) * 37]) == list(range(37)) for e in range(len(b_rows) // 37))
    other_seed = MixedRows([ArrayRows(0, 50), ArrayRows(1, 37)], mixture, seed=1, global_batch=16)
    assert [rows.locate(g)[0] for g in range(64)] == [other_seed.locate(g)[0] for g in range(64)]
    assert [rows.locate(g) for g in range(64)] != [other_seed.locate(g) for g in range(64)]
    # The same global batches read by 2 processes, and started at step 150 (a resume).
    halves = [next(iter(train_dataset(rows, 16, seed=0, shard=(p, 2), start_step=150)))["tokens"] for p in range(2)]
    assert np.array_equal(np.concatenate(halves), batches[150])


def test_mixture_settings_are_checked_in_one_line():
    with pytest.raises(ValueError, match=r"mixture_schedule: 'c' is not a source of the mixture \(a, b\)"):
        _mixture({"a": 1, "b": 1}, "10:c=1")
    with pytest.raises(ValueError, match=r"step 10 must come after step 20"):
        _mixture({"a": 1, "b": 1}, "20:a=1;10:b=1")
    with pytest.raises(ValueError, match=r"the weights \[0.0, 0.0\] must be >= 0 and not all 0"):
        _mixture({"a": 0, "b": 0})
    d = default_config().data
    d.mixture = {"a": {"source": "text:x", "weight": 1, "colour": "red"}}
    with pytest.raises(ValueError, match=r"config.data.mixture.a.colour is not a data setting"):
        parse_mixture(d)
    d.mixture = ConfigDict({"a": {"weight": 1}})
    with pytest.raises(ValueError, match=r"config.data.mixture.a needs a 'source' and a 'weight'"):
        parse_mixture(d)


MIXTURE_CONFIG = """
from configs.smoke import get_config as smoke


def get_config():
    config = smoke()
    config.data.tokenizer = "byte"
    config.model.vocab_size = 257
    config.data.mixture = {{"words": {{"source": "text:{words}", "weight": 0.75}},
                           "digits": {{"source": "text:{digits}", "weight": 0.25, "val_fraction": 0.2}}}}
    return config
"""


def _train(workdir, config, *flags, processes=1):
    args = ["scripts/train.py", "--config", str(config), f"--workdir={workdir}", "--config.train.max_steps=6",
            "--config.optim.warmup_steps=1", "--config.train.log_every=1", "--config.train.eval_every=3",
            "--config.train.eval_batches=2", "--config.logging.progress=False", "--config.logging.tensorboard=False",
            "--config.mesh.data=-1", *flags]
    cmd = [sys.executable, *args] if processes == 1 else [
        sys.executable, "scripts/launch.py", f"--processes={processes}", "--devices_per_process=1", "--", *args]
    out = subprocess.run(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_a_mixture_trains_resumes_exactly_on_two_processes_and_reports_each_source(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "words.jsonl").write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS, 30))}) + "\n"
                                                  for _ in range(200)))
    (tmp_path / "digits.txt").write_text(" ".join(str(x) for x in rng.integers(0, 10**6, 8000)))
    config = tmp_path / "mixture.py"
    config.write_text(MIXTURE_CONFIG.format(words=tmp_path / "words.jsonl", digits=tmp_path / "digits.txt"))
    whole = _train(tmp_path / "whole", config)
    _train(tmp_path / "resumed", config, "--config.train.stop_after=3")
    resumed = _train(tmp_path / "resumed", config, processes=2)
    losses = [[r["loss"] for r in rows if "loss" in r] for rows in (whole, resumed)]
    assert len(losses[0]) == 6
    np.testing.assert_allclose(losses[1], losses[0], atol=1e-5, rtol=0)
    evals = [r for r in whole if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:  # the mixture's val_loss: the sources' under the starting weights
        assert r["val_loss"] == pytest.approx(0.75 * r["val_loss/words"] + 0.25 * r["val_loss/digits"], rel=1e-6)
    resumed_evals = [r for r in resumed if "val_loss" in r]
    assert resumed_evals[-1]["val_loss/digits"] == pytest.approx(evals[-1]["val_loss/digits"], abs=1e-5)
    assert (tmp_path / "whole" / "data" / "words" / "train.tokens.json").exists()
