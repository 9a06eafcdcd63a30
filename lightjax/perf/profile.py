"""Where a train step's time goes: JAX's profiler over a few steps, each XLA op's time attributed to a
part of the model by the op's name scope in the compiled program.

`jax.profiler.trace` records one event per executed op (a fusion, a library matmul, a copy) on the
threads that run them; the compiled program's text names each op's source (`op_name` metadata, e.g.
`jit(step)/transpose(jvp(GPT))/GPT._blocks/h_3/mlp/fc/dot_general`), from which `category` says which
part of the step it belongs to, and whether it is the forward or the backward pass. Op times are
summed per category and divided by the steps traced; ops on the two cores overlap, so the sum can
exceed the step's wall time (their ratio is the parallelism reached).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile
import time
from typing import Any

import jax

from lightjax.perf.benchmark import decode_program, synthetic_inputs
from lightjax.runtime.hlo import op_names
from lightjax.train.run import build_run

# (category, pattern over the op's name scope), first match wins.
CATEGORIES = (
    ("matmul: attention qkv/proj", r"/attn/(qkv|proj)/.*dot_general"),
    ("matmul: MLP", r"/mlp/.*(dot_general|einsum)"),
    ("matmul: head", r"/lm_head/.*dot_general|/wte/.*(dot_general|matmul)"),
    ("attention core (scores, softmax, RoPE)", r"/attn/"),
    ("MLP element-wise (activation)", r"/mlp/"),
    ("norms", r"norm|/ln_f/"),
    ("embedding", r"/wte/"),
    ("other model element-wise (residuals, RoPE tables)", r"GPT"),
    ("loss", r"[/(]loss[/)]"),
    ("optimizer (clip, AdamW)", r"/optimizer/"),
    ("sampling (top-k, top-p, argmax)", r"top_k|top_p|argmax|sort|categorical|gumbel"),
)


def category(op_name: str) -> str:
    for name, pattern in CATEGORIES:
        if re.search(pattern, op_name):
            return name
    return "other (step bookkeeping, copies)"


def _op_events(trace_dir: str) -> list[dict[str, Any]]:
    (path,) = glob.glob(f"{trace_dir}/plugins/profile/*/perfetto_trace.json.gz")
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X"]


def profile_train_step(config: Any, steps: int = 3) -> dict[str, Any]:
    """Milliseconds per step by category (see CATEGORIES), forward and backward apart, the step's wall
    time, and the ten most expensive ops."""
    run = build_run(config, jax.devices()[:1])
    state, batch = synthetic_inputs(run, config)
    t = config.train
    compiled = run.train_step.lower(state, batch).compile()

    def step() -> None:
        nonlocal state
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)

    r = _profile(compiled.as_text(), step, steps, steps)
    return {"model": run.model.config.name, "global_batch_size": t.global_batch_size,
            "seq_len": config.data.seq_len, **r}


def profile_decode(config: Any, batch: int, prompt_len: int = 16, new_tokens: int = 128) -> dict[str, Any]:
    """The same for decoding: milliseconds per decode step (one new token for every row) by category,
    over one generation of `new_tokens` tokens after `prompt_len`-token prompts (prefill included)."""
    compiled, args, model = decode_program(config, batch, prompt_len, new_tokens)

    def call() -> None:
        jax.block_until_ready(compiled(*args))

    r = _profile(compiled.as_text(), call, 1, new_tokens)
    return {"model": model.config.name, "global_batch_size": batch, "seq_len": f"{prompt_len}+{new_tokens} decode",
            **r}


def _profile(hlo_text: str, call: Any, calls: int, steps: int) -> dict[str, Any]:
    """Trace `calls` calls of a compiled program (after two untimed ones): op time per category and
    per op, divided by the `steps` the calls make; the wall time per step."""
    names = op_names(hlo_text)
    for _ in range(2):
        call()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(calls):
                call()
        wall = time.perf_counter() - start
        events = _op_events(tmp)
    per_category: dict[str, float] = collections.defaultdict(float)
    per_op: dict[str, float] = collections.defaultdict(float)
    for e in events:
        op_name = names.get(e["name"])
        if op_name is None:  # the runtime's own spans (executor, Python), not ops
            continue
        ms = e.get("dur", 0) / 1e3 / steps
        pass_ = "backward" if "transpose(" in op_name else "forward"
        per_category[(category(op_name), pass_)] += ms
        per_op[e["name"]] += ms
    ops_ms = sum(per_category.values())
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:10]
    return {"steps": steps, "step_ms": wall * 1e3 / steps, "ops_ms": ops_ms,
            "categories": {f"{c} [{p}]": ms for (c, p), ms in sorted(per_category.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"op": n, "ms": ms, "op_name": names[n]} for n, ms in top]}


def format_profile(r: dict[str, Any]) -> str:
    lines = [f"{r['model']}, batch {r['global_batch_size']} x {r['seq_len']}: step {r['step_ms']:.1f} ms wall, "
             f"{r['ops_ms']:.1f} ms of ops summed over threads ({r['ops_ms'] / r['step_ms']:.2f} ops in parallel "
             f"on average), {r['steps']} steps traced", "", "| part of the step | ms per step | share of op time |",
             "|---|---|---|"]
    lines += [f"| {name} | {ms:.1f} | {ms / r['ops_ms']:.1%} |" for name, ms in r["categories"].items()]
    lines += ["", "Most expensive ops:"]
    lines += [f"  {o['ms']:8.1f} ms  {o['op']:<28} {o['op_name']}" for o in r["top_ops"]]
    return "\n".join(lines)
