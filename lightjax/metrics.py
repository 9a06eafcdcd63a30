"""Model FLOPs, peak FLOP/s per device kind, and MFU.

FLOPs per token of one training step (forward + backward), as nanoGPT and the PaLM paper count them:

    6 * N  +  12 * n_layer * n_head * head_size * T

- 6N: each parameter used in a matmul costs 2 FLOPs per token forward and 4 backward. N counts the
  matmul parameters: everything except the input embedding table (a lookup, not a matmul) unless
  the table is tied to the output head, where it is used in a matmul once. Norms and biases are
  included, as nanoGPT includes them; they are a rounding error.
- 12 L H Q T: attention scores (QK^T) and the weighted sum (AV), 2 * 2 * T * H * Q FLOPs per token
  and layer forward, times 3 for forward + backward. Causal masking is ignored (as in PaLM), so this
  counts the full T x T square.

MFU = achieved model FLOP/s / (peak FLOP/s per device * devices). Rematerialisation does not count:
recomputed FLOPs are the hardware's cost, not the model's.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp

from lightjax.config import ModelConfig
from lightjax.model import abstract_params, count_params

# Dense bfloat16 peak FLOP/s per device (chip for TPUs, GPU for NVIDIA), from vendors' data sheets.
PEAK_FLOPS_BF16 = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p reports itself as "TPU v5"
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "A100": 312e12,
    "H100": 989e12,  # SXM; dense, without sparsity
    "H200": 989e12,
}


def matmul_params(cfg: ModelConfig) -> int:
    """N in 6N: parameters that take part in matmuls (see module docstring)."""
    n = count_params(abstract_params(cfg))
    return n if cfg.tie_embeddings else n - cfg.padded_vocab_size * cfg.n_embd


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`."""
    return 6 * matmul_params(cfg) + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * seq_len


def lookup_peak_flops(device_kind: str) -> float | None:
    """Peak bf16 FLOP/s for a `jax.Device.device_kind`, or None when unknown (e.g. CPUs)."""
    # Longest names first, so that "TPU v5 lite" wins over "TPU v5".
    for name in sorted(PEAK_FLOPS_BF16, key=len, reverse=True):
        if name.lower() in device_kind.lower():
            return PEAK_FLOPS_BF16[name]
    return None


@functools.lru_cache
def measure_matmul_flops(n: int = 2048, dtype: Any = jnp.float32, repeats: int = 10,
                         device: jax.Device | None = None) -> float:
    """Best-of-`repeats` FLOP/s of an n x n x n matmul on one device: a practical peak for CPUs,
    which publish none (about 490 GFLOP/s in float32 on the 2-core development machine)."""
    device = device or jax.devices()[0]
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_flops_per_device(configured: float = 0.0, dtype: Any = jnp.float32) -> tuple[float, str]:
    """(peak FLOP/s per device, where the figure came from): the config value when set, else the
    table for the device kind, else a matmul measurement (CPU)."""
    if configured > 0:
        return configured, "config"
    device = jax.devices()[0]
    table = lookup_peak_flops(device.device_kind)
    if table is not None:
        return table, f"table ({device.device_kind}, bf16)"
    # Simulated CPU devices share the same cores: measure one, then split it between them.
    per_device = measure_matmul_flops(dtype=dtype) / (jax.local_device_count() if device.platform == "cpu" else 1)
    return per_device, f"measured ({device.device_kind} matmul, {jnp.dtype(dtype).name})"


def mfu(tokens_per_sec: float, flops_per_tok: float, peak_per_device: float, n_devices: int) -> float:
    return tokens_per_sec * flops_per_tok / (peak_per_device * n_devices)


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs of one call of a compiled function, from XLA's cost analysis (None if unavailable)."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 (some backends do not implement it)
        return None
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops else None
