"""Train-step benchmark: compile time, step time, tokens/s, MFU and per-device memory of one setting.

Figures come from synthetic batches of the configured shape, so they measure the step alone: no data
pipeline, no host stalls. The FLOPs of the model (model/flops.py flops_per_token) are cross-checked against
XLA's own count of the compiled step.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from etils import epath

from lightjax.data.pipeline import train_iterator
from lightjax.data.rows import TokenRows
from lightjax.data.sources import load_split
from lightjax.data.tokenizers import make_tokenizer
from lightjax.data.tokens import write_token_file
from lightjax.model.flops import causal_keys, flops_per_token
from lightjax.model.generate import decode_inputs, decode_loop, generate
from lightjax.runtime.hardware import mfu, peak_flops_per_device
from lightjax.runtime.hlo import compiled_flops
from lightjax.runtime.sharding import shard_batch
from lightjax.train.checkpoint import Checkpointer, state_digests
from lightjax.train.config import resolve_model_config
from lightjax.train.run import Run, build_model, build_run
from lightjax.train.step import synthetic_batch
from lightjax.train.validate import validate


def synthetic_inputs(run: Run, config: Any, documents: bool = False) -> tuple[Any, dict[str, jax.Array]]:
    """(a fresh train state, this process's share of a random batch of the config's shape placed on
    the mesh): what the benchmarks time the step on, with no data pipeline in the way; plain rows, or
    with `documents` document-masked ones; for a preference run, rows of a pair (two halves)."""
    local_batch = config.train.global_batch_size // jax.process_count()
    tokens = synthetic_batch(np.random.default_rng(0), local_batch, config.data.seq_len, run.model.config.vocab_size,
                             documents or run.preference)
    if run.preference:
        tokens = synthetic_pairs(tokens)
    return run.init_state(), shard_batch(tokens, run.mesh)


def synthetic_pairs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A synthetic batch laid out as preference rows: the chosen side the first half, the rejected the
    second, each its own document (positions from 0) with every target a response token."""
    seq = batch["mask"].shape[1]
    half = np.arange(seq) >= seq // 2
    out = {k: v for k, v in batch.items() if k != "mask"}
    out["segment_ids"] = np.broadcast_to(1 + half.astype(np.int32), batch["mask"].shape).copy()
    out["positions"] = np.broadcast_to(np.where(half, np.arange(seq) - seq // 2, np.arange(seq)),
                                       batch["mask"].shape).astype(np.int32)
    out["chosen_mask"], out["rejected_mask"] = (np.broadcast_to(m, batch["mask"].shape).astype(np.int32)
                                                for m in (~half, half))
    return out


def benchmark_train_step(config: Any, steps: int = 10, warmup: int = 2,
                         devices: list[jax.Device] | None = None) -> dict[str, Any]:
    run = build_run(config, devices)
    state, batch = synthetic_inputs(run, config)
    cfg, mesh = run.model.config, run.mesh
    t, seq = config.train, config.data.seq_len

    start = time.perf_counter()
    compiled = run.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start

    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)

    n_devices = mesh.size
    tokens_per_step = t.global_batch_size * seq
    tokens_per_s = tokens_per_step / step_s
    flops_tok = flops_per_token(cfg, seq)
    device = mesh.devices.flat[0]  # the mesh's own devices, not necessarily jax.devices()
    peak, peak_source = peak_flops_per_device(t.peak_flops, dtype=run.model.dtype, device=device)
    mem = compiled.memory_analysis()
    xla_flops = compiled_flops(compiled)
    # XLA counts one device's share of the partitioned program; the model count is for all tokens.
    xla_ratio = xla_flops * n_devices / (flops_tok * tokens_per_step) if xla_flops else None
    return {
        "model": cfg.name,
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "devices": n_devices,
        "device_kind": device.device_kind,
        "global_batch_size": t.global_batch_size,
        "seq_len": seq,
        "grad_accum_steps": t.grad_accum_steps,
        "dtype": t.dtype,
        "remat": t.remat,
        "scan_layers": t.scan_layers,
        "compile_s": compile_s,
        "step_ms": step_s * 1e3,
        "step_ms_all": [x * 1e3 for x in times],
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_tok,
        "peak_flops_per_device": peak,
        "peak_source": peak_source,
        "mfu": mfu(tokens_per_s, flops_per_token(cfg, seq, causal_keys(seq)), peak, n_devices),  # causal attention
        "mfu_full_square": mfu(tokens_per_s, flops_tok, peak, n_devices),
        "xla_flops_ratio": xla_ratio,
        "argument_bytes_per_device": mem.argument_size_in_bytes if mem else None,
        "output_bytes_per_device": mem.output_size_in_bytes if mem else None,
        "temp_bytes_per_device": mem.temp_size_in_bytes if mem else None,
        "peak_bytes_per_device": (device.memory_stats() or {}).get("peak_bytes_in_use"),
        "final_loss": float(metrics["loss"]),
    }


def _mib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.1f} MiB"


def format_result(r: dict[str, Any]) -> str:
    mesh = "x".join(str(r["mesh"][a]) for a in ("data", "fsdp", "tensor"))
    xla = "n/a" if r["xla_flops_ratio"] is None else f"{r['xla_flops_ratio']:.2f}"
    return (f"{r['model']} mesh(data x fsdp x tensor)={mesh} batch={r['global_batch_size']}x{r['seq_len']} "
            f"accum={r['grad_accum_steps']} {r['dtype']} remat={r['remat']} scan={r['scan_layers']} | "
            f"compile {r['compile_s']:.1f} s | step {r['step_ms']:.1f} ms (median of {len(r['step_ms_all'])}) | "
            f"{r['tokens_per_s']:,.0f} tok/s | MFU {100 * r['mfu']:.1f}% "
            f"(full square {100 * r['mfu_full_square']:.1f}%) of {r['peak_flops_per_device'] / 1e9:,.0f} "
            f"GFLOP/s/device [{r['peak_source']}] | XLA/model FLOPs {xla} | per device: args "
            f"{_mib(r['argument_bytes_per_device'])}, temp {_mib(r['temp_bytes_per_device'])}, "
            f"out {_mib(r['output_bytes_per_device'])}"
            + ("" if r.get("peak_bytes_per_device") is None else f", peak in use {_mib(r['peak_bytes_per_device'])}"))


def benchmark_data(config: Any, num_workers: int, batches: int = 200) -> dict[str, Any]:
    """What preparing the training split costs (time, disk) and the tokens/s that the training
    pipeline then delivers for the configured data settings (one process)."""
    d, t = config.data, config.train
    start = time.perf_counter()
    docs = load_split(d, "train")
    tokenizer = make_tokenizer(d.tokenizer, docs)
    with tempfile.TemporaryDirectory() as tmp:
        path = epath.Path(tmp) / "train.tokens"
        meta = write_token_file(docs, tokenizer, path)
        prepare_s = time.perf_counter() - start
        it = train_iterator(TokenRows(path, d.seq_len), t.global_batch_size, t.seed, num_workers)
        start = time.perf_counter()
        next(it)  # start-up: workers
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(batches):
            np.asarray(next(it)["tokens"])
        elapsed = time.perf_counter() - start
        if hasattr(it, "close"):
            it.close()
        file_bytes = path.stat().length
    tokens = batches * t.global_batch_size * (d.seq_len + 1)
    return {"source": d.source, "tokenizer": d.tokenizer, "num_workers": num_workers, "prepare_s": prepare_s,
            "prepared_tokens": meta["tokens"], "prepared_bytes": file_bytes, "first_batch_s": first_s,
            "batches": batches, "tokens_per_s": tokens / elapsed}


def format_data_result(r: dict[str, Any]) -> str:
    return (f"data {r['source']} tokenizer={r['tokenizer']} workers={r['num_workers']} | prepared "
            f"{r['prepared_tokens']:,} tokens ({r['prepared_bytes'] / 2**20:,.1f} MiB) in {r['prepare_s']:.2f} s "
            "(reading, tokenizer, file) | first batch "
            f"{r['first_batch_s']:.2f} s | {r['tokens_per_s']:,.0f} tok/s over {r['batches']} batches")


def benchmark_checkpoint(config: Any, steps: int = 20, save_every: int = 10) -> dict[str, Any]:
    """How long an (async) save blocks the loop, and the mean step time with and without saving
    every `save_every` steps (synthetic batches, so only the model and the saves are timed)."""
    run = build_run(config)
    state, batch = synthetic_inputs(run, config)
    state, metrics = run.train_step(state, batch)  # compile
    jax.block_until_ready(metrics)

    def timed_steps(n: int, checkpointer: Checkpointer | None) -> tuple[float, list[float]]:
        nonlocal state
        blocked = []
        start = time.perf_counter()
        for i in range(1, n + 1):
            state, metrics = run.train_step(state, batch)
            if checkpointer is not None and i % save_every == 0:
                jax.block_until_ready(state)  # time the save alone, not the step it would wait for
                t0 = time.perf_counter()
                checkpointer.save(i, state, {"config": {}})
                blocked.append(time.perf_counter() - t0)
            jax.block_until_ready(metrics)
        return (time.perf_counter() - start) / n, blocked

    plain_s, _ = timed_steps(steps, None)
    with tempfile.TemporaryDirectory() as tmp:
        checkpointer = Checkpointer(tmp, keep=2, async_save=config.checkpoint.async_save)
        saving_s, blocked = timed_steps(steps, checkpointer)
        checkpointer.wait()
        restore_s = _timed(lambda: checkpointer.restore(checkpointer.steps()[-1], run.abstract_state))
        checkpointer.close()
    digest_s = _timed(lambda: state_digests(state))  # part of every save and every restore
    return {"model": run.model.config.name, "async_save": config.checkpoint.async_save, "steps": steps,
            "save_every": save_every, "step_ms_without_saves": plain_s * 1e3,
            "step_ms_with_saves": saving_s * 1e3, "save_blocking_ms": [b * 1e3 for b in blocked],
            "restore_ms": restore_s * 1e3, "digest_ms": digest_s * 1e3,
            "state_mib": sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20}


def _timed(fn: Any, repeats: int = 3) -> float:
    """Median seconds of fn() after one untimed call (compilation)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _decode_setup(config: Any, batch: int, prompt_len: int) -> tuple[Any, Any, list[list[int]]]:
    """(model, random parameters, `batch` random prompts of `prompt_len` tokens) for the decode
    benchmarks: speed does not depend on the weights."""
    validate(config, 1)
    cfg = resolve_model_config(config)
    model = build_model(cfg, config.train)
    params = jax.jit(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))["params"]))()
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt_len)).tolist()
    return model, params, prompts


def decode_program(config: Any, batch: int, prompt_len: int = 16, new_tokens: int = 128) -> tuple[Any, tuple, Any]:
    """(the compiled greedy decode program, its arguments, the model) for `batch` random prompts."""
    model, params, prompts = _decode_setup(config, batch, prompt_len)
    args, cache_len = decode_inputs(model.config, prompts, min(new_tokens, model.config.block_size - prompt_len))
    compiled = decode_loop().lower(model, params, *args, cache_len=cache_len).compile()
    return compiled, (params, *args), model


def benchmark_generate(config: Any, batch: int, prompt_len: int = 16, new_tokens: int = 128,
                       repeats: int = 3) -> dict[str, Any]:
    """Decode speed of the config's model (random weights): new tokens/s for `batch` prompts of
    `prompt_len` tokens, greedy, median of `repeats` after a compiling run."""
    model, params, prompts = _decode_setup(config, batch, prompt_len)
    new_tokens = min(new_tokens, model.config.block_size - prompt_len)
    start = time.perf_counter()
    generate(model, params, prompts, new_tokens)
    first_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate(model, params, prompts, new_tokens)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    produced = sum(len(o) for o in out)
    return {"framework": "lightjax", "model": model.config.name, "batch": batch, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "seconds": seconds, "tokens_per_sec": produced / seconds,
            "ms_per_step": 1e3 * seconds / new_tokens, "first_call_s": first_s,
            "device_kind": jax.devices()[0].device_kind}
