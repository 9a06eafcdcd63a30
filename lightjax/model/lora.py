"""LoRA (Hu et al., 2021): low-rank adapters trained beside frozen weights, as LitGPT's `finetune_lora`.

An adapted linear layer keeps its kernel W frozen and computes

    y = x W + (alpha / r) * dropout(x) A B        A: [in, r], random;  B: [r, out], zeros

so that a LoRA model starts out computing exactly the base model. A and B are ordinary parameters,
`lora_a` and `lora_b`, beside the layer's `kernel` (layers.Linear), carrying the kernel's logical
axes on their in and out sides, so they shard like it on any mesh and in both layer layouts.

Which layers are adapted is `ModelConfig.lora_targets` (LitGPT's lora_query, lora_key, ... flags):
'query', 'key' and 'value' share the fused qkv kernel, whose B is masked to the chosen slots.

The train step differentiates the adapters only (`split`, `combine`), the optimizer keeps state for
them only, and `merge` folds them into the kernels (W + alpha / r * A B) for export.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any

import jax.numpy as jnp
from flax import traverse_util

from lightjax.model.config import ModelConfig

ADAPTER_NAMES = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class LoRA:
    """One layer's adapter settings (hashable: a Flax module field)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    # The fused qkv kernel only: which of its q_per_kv + 2 slots per group (queries, key, value) adapt.
    slots: tuple[bool, ...] | None = None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def mask(self, b: Any) -> Any:
        """B with the slots that are not adapted zeroed (B of qkv is [r, groups, slots, head_size])."""
        if self.slots is None:
            return b
        return b * jnp.asarray(self.slots, b.dtype)[:, None]


def lora_for(cfg: ModelConfig, target: str) -> LoRA | None:
    """The adapter of the layers named `target` ('proj', 'mlp' or 'head'), None when not adapted."""
    if cfg.lora_r == 0 or target not in cfg.lora_targets:
        return None
    return LoRA(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)


def qkv_lora(cfg: ModelConfig) -> LoRA | None:
    """The fused qkv projection's adapter: B masked to the query, key and value slots targeted."""
    slots = ("query",) * cfg.q_per_kv + ("key", "value")
    chosen = tuple(s in cfg.lora_targets for s in slots)
    if cfg.lora_r == 0 or not any(chosen):
        return None
    return LoRA(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, None if all(chosen) else chosen)


def split(params: Any) -> tuple[dict, dict]:
    """(adapters, everything else) of a parameter tree, each nested as the original."""
    flat = traverse_util.flatten_dict(params)
    adapters = {k: v for k, v in flat.items() if k[-1] in ADAPTER_NAMES}
    rest = {k: v for k, v in flat.items() if k[-1] not in ADAPTER_NAMES}
    return traverse_util.unflatten_dict(adapters), traverse_util.unflatten_dict(rest)


def combine(adapters: Any, rest: Any) -> Any:
    """The inverse of `split` (and of `trainable`)."""
    if not adapters or not rest:
        return adapters or rest
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(rest), **traverse_util.flatten_dict(adapters)})


def trainable(cfg: ModelConfig, params: Any) -> tuple[Any, Any]:
    """(the parameters that train, those frozen): with LoRA the adapters and the rest, else all and none."""
    return split(params) if cfg.lora_r else (params, {})


def merge(cfg: ModelConfig, params: Any) -> tuple[ModelConfig, dict]:
    """(the config without LoRA, params with every adapter folded into its kernel: W + alpha/r * A B),
    in either layer layout; a model without adapters comes back as it is."""
    if cfg.lora_r == 0:
        return cfg, params
    qkv_slots = qkv_lora(cfg)
    flat = traverse_util.flatten_dict(params)
    out = {k: v for k, v in flat.items() if k[-1] not in ADAPTER_NAMES}
    for key, a in flat.items():
        if key[-1] != "lora_a":
            continue
        layer = key[:-1]
        b = flat[(*layer, "lora_b")]
        if layer[-1] == "qkv" and qkv_slots is not None:
            b = qkv_slots.mask(b)
        kernel = flat[(*layer, "kernel")]
        delta = cfg.lora_alpha / cfg.lora_r * _product(a, b, kernel.ndim)
        out[(*layer, "kernel")] = (kernel + delta).astype(kernel.dtype)
    return cfg.replace(lora_r=0), traverse_util.unflatten_dict(out)


def _product(a: Any, b: Any, kernel_ndim: int) -> Any:
    """A B over the rank axis, batched over any leading axes they share (the scan layout's layers):
    A is [lead..., in..., r], B [lead..., r, out...], the kernel [lead..., in..., out...]."""
    lead = a.ndim + b.ndim - 2 - kernel_ndim
    letters = iter(string.ascii_letters)
    shared = "".join(next(letters) for _ in range(lead))
    ins = "".join(next(letters) for _ in range(a.ndim - 1 - lead))
    outs = "".join(next(letters) for _ in range(b.ndim - 1 - lead))
    r = next(letters)
    return jnp.einsum(f"{shared}{ins}{r},{shared}{r}{outs}->{shared}{ins}{outs}",
                      jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))

