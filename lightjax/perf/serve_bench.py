"""Serving throughput and latency, continuous batching beside one batch at a time: what `scripts/benchmark.py
--serve` prints.

The config's model with random weights and the byte tokenizer serves a fixed trace: `requests` requests of
mixed prompt lengths (a tenth to a quarter of the context) and completion lengths (8 tokens to half the
context, log-uniform or uniform; EOS ignored so that every request wants exactly its length), arriving one
every 1/`rate` seconds.
The same engine runs the trace twice with the same slots: `continuous` (a request joins at the first free
slot) and `static` (a new batch starts only when the whole last one has finished). Each run reports the
generated tokens per second over the trace, and the median and 99th percentile of the time to the first
token and of the whole request's latency, from its arrival.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from lightjax.data.tokenizers import ByteTokenizer
from lightjax.model.gpt import GPT
from lightjax.serve.engine import Engine, Request
from lightjax.train.config import resolve_model_config

LENGTHS = ("loguniform", "uniform")


def trace(requests: int, context: int, lengths: str = "loguniform", seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt ids, completion length) of each request: prompts of context/10..context/4 bytes, completions
    of 8..context/2 tokens, log-uniform (most short, a few long: chat traffic's long tail) or uniform."""
    if lengths not in LENGTHS:
        raise ValueError(f"--serve_lengths={lengths!r} is not one of {', '.join(LENGTHS)}.")
    rng = np.random.default_rng(seed)
    prompts = rng.integers(context // 10, context // 4 + 1, requests)
    low, high = 8, context // 2
    if lengths == "uniform":
        outputs = rng.integers(low, high + 1, requests)
    else:
        outputs = np.exp(rng.uniform(np.log(low), np.log(high + 1), requests)).astype(int)
    return [(rng.integers(32, 127, int(p)).tolist(), int(n)) for p, n in zip(prompts, outputs, strict=True)]


def run_trace(engine: Engine, requests: list[tuple[list[int], int]], rate: float) -> dict[str, Any]:
    """Serve `requests` arriving at `rate` per second on the (warmed-up) engine; its figures."""
    done = threading.Event()
    finished: list[Request] = []

    def emit(request: Request) -> Any:
        def on_event(event: Any) -> None:
            if event.finish:
                finished.append(request)
                if len(finished) == len(requests):
                    done.set()
        return on_event

    engine.start()
    start = time.perf_counter()
    try:
        for i, (prompt, n) in enumerate(requests):
            time.sleep(max(0.0, start + i / rate - time.perf_counter()))
            request = Request(prompt, n, lambda event: None, ignore_eos=True)
            request.emit = emit(request)
            engine.submit(request)
        done.wait()
    finally:
        engine.stop()
    first = np.array([r.times["first_token"] - r.times["queued"] for r in finished])
    total = np.array([r.times["done"] - r.times["queued"] for r in finished])
    seconds = max(r.times["done"] for r in finished) - start
    tokens = sum(len(r.tokens) for r in finished)
    return {"policy": engine.policy, "slots": engine.slots, "requests": len(finished), "rate": rate,
            "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "decode_steps": engine.steps,
            "decode_s": engine.seconds["decode"], "prefill_s": engine.seconds["prefill"],
            "ttft_p50_s": float(np.percentile(first, 50)), "ttft_p99_s": float(np.percentile(first, 99)),
            "latency_p50_s": float(np.percentile(total, 50)), "latency_p99_s": float(np.percentile(total, 99))}


def compare(config: Any, requests: int = 64, rate: float = 8.0, slots: int = 8,
            lengths: str = "loguniform") -> list[dict[str, Any]]:
    """The trace served continuously and one batch at a time by the config's model (random weights)."""
    cfg = resolve_model_config(config).replace(vocab_size=257, padded_vocab_size=None)
    model = GPT(cfg)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))["params"])
    work = trace(requests, cfg.block_size, lengths)
    results = []
    for policy in ("continuous", "static"):
        engine = Engine(model, params, ByteTokenizer(), slots=slots, policy=policy, max_queue=requests)
        engine.warm_up()
        results.append({"model": cfg.name, "lengths": lengths, **run_trace(engine, work, rate)})
    return results


def format_result(r: dict[str, Any], baseline: dict[str, Any] | None = None) -> str:
    line = (f"{r['model']} {r['policy']:>10} | {r['slots']} slots, {r['requests']} requests at {r['rate']:g}/s, "
            f"{r['lengths']} lengths | "
            f"{r['tokens_per_s']:,.0f} tokens/s | first token p50 {r['ttft_p50_s']:.2f} s p99 {r['ttft_p99_s']:.2f} s"
            f" | latency p50 {r['latency_p50_s']:.2f} s p99 {r['latency_p99_s']:.2f} s | {r['decode_steps']} decode "
            f"steps ({r['tokens'] / r['decode_steps']:.1f} tokens each) {r['decode_s']:.2f} s, prefill "
            f"{r['prefill_s']:.2f} s")
    if baseline is not None:
        line += (f" | {r['tokens_per_s'] / baseline['tokens_per_s']:.2f}x the throughput, p99 latency "
                 f"{r['latency_p99_s'] / baseline['latency_p99_s']:.2f}x, "
                 f"{baseline['decode_steps'] / r['decode_steps']:.2f}x fewer decode steps")
    return line
