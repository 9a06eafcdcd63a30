"""Causal self-attention: grouped-query heads, RoPE, optional q/k norms, sliding windows, soft-capping,
and the KV cache that decoding passes through the model."""

from __future__ import annotations

import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from lightjax.layers import Array, Dtype, Linear, apply_rope, compute_dtype, constrain, init_stds, make_norm
from lightjax.model_config import ModelConfig

ACT_HEADS = ("batch", "length", "act_heads", "act_kv")
CACHE_AXES = ("layers", "batch", None, "act_heads", "act_kv")  # kv heads over tensor, like the qkv kernel


def causal_attention(q: Array, k: Array, v: Array, scale: float, mask: Array | None = None,
                     window: int | None = None, softcap: float | None = None,
                     window_on: Array | None = None) -> Array:
    """softmax(q k^T * scale + mask) v for q [B, T, n_head, hs], k and v [B, S, n_groups, hs].

    Without `mask` the mask is causal (S == T), limited to the last `window` keys when given (and,
    with a traced bool `window_on`, only where it is true: the layers of a scanned stack differ).
    Then `jax.nn.dot_product_attention` computes it, grouped queries natively: cuDNN flash attention
    on GPU for bfloat16/float16 (asked for by name: JAX's default is XLA's version), XLA's elsewhere.
    The explicit path below runs instead with `mask` (bool, broadcastable to [B, 1, T, S]: which
    keys each query sees, as decoding with a KV cache needs: for one query against a cache it is
    faster than the fused call on CPU), with `softcap` (Gemma 2: scores -> softcap * tanh(scores / softcap)),
    and in float64 (gradient checks): the fused version's softmax is float32.
    """
    if mask is None and softcap is None and q.dtype != jnp.float64:
        if window_on is None or window is None:
            return _fused_attention(q, k, v, scale, window)
        return jax.lax.cond(window_on, lambda: _fused_attention(q, k, v, scale, window),
                            lambda: _fused_attention(q, k, v, scale, None))
    B, T, N, hs = q.shape
    S, G = k.shape[1], k.shape[2]
    qg = q.reshape(B, T, G, N // G, hs)  # query head n belongs to group n // (N // G)
    scores = jnp.einsum("btgqh,bsgh->bgqts", qg, k).astype(compute_dtype(q.dtype)) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    if mask is None:
        mask = causal_mask(jnp.arange(T), S, window, window_on)
    probs = jax.nn.softmax(jnp.where(mask[:, :, None], scores, -jnp.inf), axis=-1).astype(v.dtype)
    return jnp.einsum("bgqts,bsgh->btgqh", probs, v).reshape(B, T, N, hs)


def _fused_attention(q: Array, k: Array, v: Array, scale: float, window: int | None) -> Array:
    local = None if window is None else (window - 1, 0)
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:  # JAX's default is XLA's version, which keeps every layer's [B, N, T, S] scores for backward
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale, local_window_size=local,
                                                implementation="cudnn")
        except (NotImplementedError, ValueError):  # a head size or shape cuDNN does not take
            pass
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale, local_window_size=local)


def causal_mask(q_slot: Array, S: int, window: int | None = None, window_on: Array | None = None) -> Array:
    """[1, 1, T, S]: query slot q_slot[t] sees key slots <= its own, and with a window the last
    `window` of them only (itself included, as Hugging Face counts), where `window_on` (if given)."""
    k_slot = jnp.arange(S)[None, :]
    mask = k_slot <= q_slot[:, None]
    if window is not None:
        inside = k_slot > q_slot[:, None] - window
        mask &= inside if window_on is None else (inside | ~window_on)
    return mask[None, None]


class KVCache(flax.struct.PyTreeNode):
    """Keys and values of every layer for decoding: slots [0, index) are filled. Row b's real tokens
    start at slot start[b] (prompts are left-padded to a common length), so its RoPE position is
    slot - start[b] and its queries never see the padding."""

    k: Array  # [n_layer, B, S, n_query_groups, head_size]
    v: Array
    index: Array  # int32 scalar: the next free slot
    start: Array  # int32 [B]

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, length: int, dtype: Dtype, start: Array | None = None) -> KVCache:
        shape = (cfg.n_layer, batch, length, cfg.n_query_groups, cfg.head_size)
        start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32), start)

    def mask(self, T: int) -> Array:
        """[B, 1, T, S]: the query in slot index+t sees keys from start[b] up to its own slot. A padding
        query sees only itself, so that its (unused) output stays finite."""
        q_slot = self.index + jnp.arange(T)[:, None]  # [T, 1]
        k_slot = jnp.arange(self.k.shape[2])[None, :]  # [1, S]
        causal = k_slot <= q_slot
        real = (k_slot[None] >= self.start[:, None, None]) | (k_slot == q_slot)[None]
        return (causal[None] & real)[:, None]


class CausalSelfAttention(nn.Module):
    """Multi-head, grouped-query or multi-query attention with a fused qkv projection.

    The qkv kernel is [n_embd, n_query_groups, q_per_kv + 2, head_size]: for each query group its
    q_per_kv query heads, then its key head, then its value head (LitGPT's grouped layout). Keeping a
    group's q, k and v together on one axis means tensor parallelism over that axis splits whole
    groups, with no resharding between the projection and the attention.
    """

    config: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, kv: tuple[Array, Array] | None = None,
                 index: Array | None = None, mask: Array | None = None,
                 window: int | None = None, window_on: Array | None = None) -> tuple[Array, tuple | None]:
        """-> (output, kv): with a layer's cache `kv` ([B, S, G, hs] each), this call's keys and values
        are written at slots index.. and the queries attend over the cache under `mask`."""
        c = self.config
        std, proj_std = init_stds(c)
        B, T, _ = x.shape
        qkv = Linear(
            (c.n_embd,), (c.n_query_groups, c.q_per_kv + 2, c.head_size), ("embed", "heads", None, "kv"),
            c.bias or c.attn_bias, std, self.dtype, self.param_dtype, name="qkv",
        )(x)
        q = qkv[:, :, :, : c.q_per_kv].reshape(B, T, c.n_head, c.head_size)  # head h uses group h // q_per_kv
        k, v = qkv[:, :, :, c.q_per_kv], qkv[:, :, :, c.q_per_kv + 1]
        q, k = self._norm_qk(q, k)
        q = constrain(apply_rope(q, cos, sin, c.rope_interleave), ACT_HEADS)
        k = constrain(apply_rope(k, cos, sin, c.rope_interleave), ACT_HEADS)
        v = constrain(v, ACT_HEADS)
        if kv is not None:
            k, v = (jax.lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype), index, axis=1)
                    for cache, new in zip(kv, (k, v), strict=True))
            kv = (constrain(k, CACHE_AXES[1:]), constrain(v, CACHE_AXES[1:]))
            k, v = k.astype(q.dtype), v.astype(q.dtype)
            if window is not None:
                mask = mask & causal_mask(index + jnp.arange(T), k.shape[1], window, window_on)
        scale = 1.0 / math.sqrt(c.attention_scores_scalar or c.head_size)
        y = causal_attention(q, k, v, scale, mask, window, c.attention_logit_softcapping, window_on)
        y = constrain(y, ACT_HEADS)
        out = Linear(
            (c.n_head, c.head_size), (c.n_embd,), ("heads", "kv", "embed"),
            c.bias, proj_std, self.dtype, self.param_dtype, name="proj",
        )(y)
        return out, kv

    def _norm_qk(self, q: Array, k: Array) -> tuple[Array, Array]:
        """RMSNorm of queries and keys before RoPE: over each head (Qwen 3, Gemma 3), or over the whole
        projection, all heads together (OLMo 2)."""
        c = self.config
        if not c.norm_qk:
            return q, k
        norm = lambda name: make_norm(c, self.dtype, self.param_dtype, name, rms=True)  # noqa: E731
        if c.norm_qk_type == "default":
            return norm("norm_q")(q), norm("norm_k")(k)
        (B, T), flat = q.shape[:2], lambda a: a.reshape(*a.shape[:2], -1)  # noqa: E731
        q = norm("norm_q")(flat(q)).reshape(B, T, c.n_head, c.head_size)
        k = norm("norm_k")(flat(k)).reshape(B, T, c.n_query_groups, c.head_size)
        return q, k
