"""What tokenizing a corpus ahead of training costs on this machine.

`scripts/benchmark.py --prepare` times the same documents and tokenizer four ways: a plain loop that only encodes
each document on one core (the yardstick), and scripts/prepare_data.py (everything a user waits for:
start-up, reading, tokenizing, writing, joining) with one process on one core, one process on every
core, and several processes (scripts/launch.py) of one core each; each with its peak memory (the
process tree's resident set, sampled). `make_corpus` and `train_bpe` make a corpus and a byte-level BPE
tokenizer to run it on, from any text.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from lightjax.data.sources import load_split
from lightjax.data.text import pieces
from lightjax.data.tokenizers import make_tokenizer

ROOT = Path(__file__).resolve().parents[2]
SPLITS = ("train", "validation")


def make_corpus(directory: str | Path, text: str, megabytes: float, files: int, seed: int = 0) -> list[Path]:
    """`files` .txt files of about `megabytes` MB in all, each of lines of `text` drawn at random (seeded)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = [line for line in text.splitlines(keepends=True) if line.strip()]
    mean = sum(len(line.encode()) for line in lines) / len(lines)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(files):
        picks = rng.integers(0, len(lines), int(megabytes * 1e6 / files / mean))
        path = directory / f"part-{i:05d}.txt"
        path.write_text("".join(lines[j] for j in picks))
        paths.append(path)
    return paths


def train_bpe(directory: str | Path, files: list[Path], vocab_size: int) -> Path:
    """A byte-level BPE tokenizer.json (with an <|endoftext|> EOS in config.json beside it, as a Hugging
    Face checkpoint has) trained on `files`: what data.tokenizer='hf:DIR' reads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train([str(f) for f in files], trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "config.json").write_text(json.dumps({"eos_token_id": tokenizer.token_to_id("<|endoftext|>"),
                                                       "vocab_size": tokenizer.get_vocab_size()}))
    return directory


def plain_loop(config: Any) -> dict[str, Any]:
    """tokens/s of encoding the documents one after the other on one core, and nothing else."""
    splits = [load_split(config.data, split) for split in SPLITS]
    tokenizer = make_tokenizer(config.data.tokenizer, splits[0])
    start, tokens, nbytes = time.perf_counter(), 0, 0
    for docs in splits:
        for i in range(len(docs)):
            for piece in pieces(docs[i]):
                tokens += len(tokenizer.encode(piece))
                nbytes += len(piece.encode("utf-8"))
    seconds = time.perf_counter() - start
    return {"way": "plain loop, 1 core", "seconds": seconds, "tokens": tokens, "bytes": nbytes}


def _tree_rss(pid: int) -> int:
    """Resident bytes of process `pid` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack += children.get(p, [])
    return total


def timed_prepare(flags: list[str], processes: int, workers: int, way: str) -> dict[str, Any]:
    """scripts/prepare_data.py with `flags` into a fresh tokens_dir, as `processes` processes of `workers`
    worker processes each: its wall time, the tokens and bytes it prepared (both splits), and the tree's peak
    memory."""
    with tempfile.TemporaryDirectory() as tmp:
        prepare = ["scripts/prepare_data.py", *flags, f"--config.data.tokens_dir={tmp}/tokens",
                   f"--config.data.prepare_workers={workers}", "--config.logging.progress=False"]
        cmd = [sys.executable, *prepare] if processes == 1 else \
            [sys.executable, "scripts/launch.py", f"--processes={processes}", "--devices_per_process=1", "--", *prepare]
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        start, peak = time.perf_counter(), 0
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output: list[str] = []
        reader = threading.Thread(target=lambda: output.append(proc.stdout.read()), daemon=True)
        reader.start()
        while proc.poll() is None:
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.2)
        seconds = time.perf_counter() - start
        reader.join()
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{output[0][-3000:]}")
        metas = [json.loads(Path(tmp, "tokens", f"{split}.tokens.json").read_text()) for split in SPLITS]
    return {"way": way, "seconds": seconds, "tokens": sum(m["tokens"] for m in metas),
            "bytes": sum(m["bytes"] for m in metas), "peak_rss": peak}


def format_prepare_result(r: dict[str, Any]) -> str:
    peak = f" | peak memory {r['peak_rss'] / 2**20:,.0f} MiB" if "peak_rss" in r else ""
    return (f"{r['way']:48s} | {r['tokens']:,} tokens in {r['seconds']:.1f} s | {r['tokens_per_s']:,.0f} tok/s, "
            f"{r['mb_per_s']:.2f} MB/s{peak}")
