"""Causal self-attention: grouped-query heads, RoPE, optional q/k norms, sliding windows, soft-capping,
and attention over the KV cache (kv_cache.py) when decoding.

Shapes, as the einsums and names (`q_bg_mh`: q laid out [b, g, m, h]) say:
    b  batch                          t  query position (T of them)
    s  key position (S: T, or the cache's length when decoding)
    g  key/value head = query group   q  query head within its group (Q = q_per_kv of them)
    h  channel of a head (head_size)  n  query head overall (n = g * Q + q)
    m  a group's queries, its Q heads' T positions stacked (m = q * T + t)
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lightjax.model.config import ModelConfig
from lightjax.model.kv_cache import KVCache
from lightjax.model.layers import (
    Array,
    Dtype,
    Linear,
    apply_rope,
    causal_mask,
    compute_dtype,
    constrain,
    init_stds,
    make_norm,
)
from lightjax.model.lora import lora_for, qkv_lora
from lightjax.model.splash import block_size, splash_attention, splash_problem

ACT_HEADS = ("batch", "length", "act_heads", "act_kv")


class LayerKind(flax.struct.PyTreeNode):
    """What sets a layer apart from the others (Gemma 2/3 alternate local and global layers).

    Each field is a Python bool when it is known while tracing, so that the layer compiles for its own
    kind; in a scanned stack whose layers differ it is a traced int32 scalar (0 or 1), and the layer
    picks its attention and RoPE table at run time."""

    windowed: bool | Array = False  # attends to the last config.sliding_window_size keys only
    local_rope: bool | Array = False  # rotates with the local RoPE table (rope_local_base_freq)

    @property
    def rope_table(self) -> int | Array:
        """0: the global RoPE table, 1: the local one."""
        return int(self.local_rope) if isinstance(self.local_rope, bool) else self.local_rope


# The attention kernels of training and evaluation (decoding always attends over the cache with einsums).
ATTENTION_KERNELS = ("auto", "einsum", "xla", "cudnn", "splash")


def resolve_attention(kernel: str, cfg: ModelConfig, dtype: Any, backend: str | None = None,
                      segments: bool = False, seq_len: int | None = None) -> tuple[str, str]:
    """(the kernel that will run, why): `kernel` as asked for, or for 'auto' the one for this backend, dtype,
    `segments` (document masks) and `seq_len`. A ValueError in one line when an explicit kernel cannot run
    here.

    - einsum: the explicit softmax(q k^T) v below, heads-major; runs everywhere, and alone takes
      Gemma 2's score soft-capping and float64 (gradient checks). On CPU it trains about 1.7x faster
      than the fused call, whose output layout the CPU matmul library handles poorly.
    - xla: `jax.nn.dot_product_attention`, XLA's own version (GPU, TPU).
    - cudnn: cuDNN's flash attention through `jax.nn.dot_product_attention` (NVIDIA GPUs, bfloat16 or
      float16): it does not keep every layer's [B, N, T, S] scores for the backward pass. JAX gives it no
      segment ids, so with document masks `auto` takes xla on a GPU (which applies them as a mask).
    - splash: the TPU Pallas kernel (splash.py): blockwise like cuDNN's, with windows, soft-capping,
      grouped queries and segment ids; `auto` on a TPU wherever the sequence length suits its blocks.
    """
    backend = backend or jax.default_backend()
    dtype = jnp.dtype(dtype)
    softcap = cfg.attention_logit_softcapping is not None
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel {kernel!r} is not one of {', '.join(ATTENTION_KERNELS)}.")
    if kernel in ("xla", "cudnn") and softcap:
        raise ValueError(f"attention kernel {kernel!r} cannot soft-cap the scores (attention_logit_softcapping="
                         f"{cfg.attention_logit_softcapping}); use 'einsum' or 'auto'.")
    problem = {"cudnn": lambda: _cudnn_problem(cfg, dtype, backend, segments),
               "splash": lambda: _splash_problem(backend, seq_len)}.get(kernel, str)()
    if problem:
        raise ValueError(f"attention kernel {kernel!r} cannot run here: {problem}; use 'auto', 'xla' or 'einsum'.")
    if kernel != "auto":
        return kernel, "as configured" + (f"; blocks of {block_size(seq_len)} tokens" if kernel == "splash" and
                                          seq_len else "")
    if not _splash_problem(backend, seq_len) and dtype != jnp.float64:
        return "splash", "auto on tpu" + (f"; blocks of {block_size(seq_len)} tokens" if seq_len else "")
    if backend == "cpu" or softcap or dtype == jnp.float64:
        reason = "CPU" if backend == "cpu" else ("score soft-capping" if softcap else "float64")
        return "einsum", f"auto: {reason}"
    problem = _cudnn_problem(cfg, dtype, backend, segments)
    return ("xla", f"auto on {backend}" + (f"; not cudnn: {problem}" if backend == "gpu" else "")) if problem \
        else ("cudnn", "auto on gpu")


def _splash_problem(backend: str, seq_len: int | None) -> str:
    if backend != "tpu":
        return f"the backend is {backend}, not a TPU"
    return splash_problem(seq_len)


def _cudnn_problem(cfg: ModelConfig, dtype: Any, backend: str, segments: bool) -> str:
    """Why cuDNN's attention cannot run this model here ('' when it can), as JAX checks it while tracing."""
    if backend != "gpu":
        return f"the backend is {backend}, not an NVIDIA GPU"
    if segments:
        return "JAX passes it no segment ids (data.document_mask=True)"
    if dtype not in (jnp.bfloat16, jnp.float16):
        return f"it takes bfloat16 or float16, not {dtype.name}"
    q = jax.ShapeDtypeStruct((1, 128, cfg.n_head, cfg.head_size), dtype)
    kv = jax.ShapeDtypeStruct((1, 128, cfg.n_query_groups, cfg.head_size), dtype)
    try:
        jax.eval_shape(functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="cudnn"),
                       q, kv, kv)
    except (NotImplementedError, ValueError, TypeError) as e:
        return (str(e).splitlines() or [type(e).__name__])[0][:160]
    return ""


def causal_attention(q: Array, k: Array, v: Array, scale: float, window: int | None = None,
                     softcap: float | None = None, kernel: str = "einsum", segment_ids: Array | None = None) -> Array:
    """softmax(q k^T * scale, over the keys each query sees) v, for q [b, t, n, h], k and v [b, t, g, h]:
    each query sees its own and earlier positions, the last `window` of them when given, and with
    `segment_ids` [b, t] only those of its own segment. `kernel` is a resolved one (resolve_attention):
    'einsum' below, 'xla' / 'cudnn' through `jax.nn.dot_product_attention`, or 'splash' (splash.py); the
    fused ones take grouped queries natively."""
    if kernel == "splash":
        return splash_attention(q, k, v, scale, window, softcap, segment_ids)
    same = None if segment_ids is None else segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    if kernel in ("xla", "cudnn"):
        local = None if window is None else (window - 1, 0)
        return jax.nn.dot_product_attention(q, k, v, mask=same, is_causal=True, scale=scale, local_window_size=local,
                                            implementation=kernel)
    T = q.shape[1]
    q_bgqth = _heads_major_queries(q, k.shape[2])
    k_bg_sh, v_bg_sh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    # Over a long sequence in query blocks: block i's queries see no key after its last position, so
    # the scores above the diagonal blocks are never computed (3/8 of them with 4 blocks). Short
    # sequences lose more to the extra ops than they save.
    blocks = QUERY_BLOCKS if T >= 256 and T % QUERY_BLOCKS == 0 else 1
    size, outs = T // blocks, []
    for i in range(blocks):
        lo, hi = i * size, (i + 1) * size
        mask = causal_mask(jnp.arange(lo, hi), hi, window)
        if same is not None:
            mask = mask & same[:, :, lo:hi, :hi]
        outs.append(_attend(q_bgqth[:, :, :, lo:hi], [k_bg_sh[:, :, :hi]], [v_bg_sh[:, :, :hi]], scale, mask, softcap))
    return _token_major(outs[0] if blocks == 1 else jnp.concatenate(outs, axis=3))


def cached_attention(q: Array, k: list[Array], v: list[Array], scale: float, mask: Array,
                     softcap: float | None = None) -> Array:
    """Attention of queries q [b, t, n, h] over a cache's keys and values: consecutive chunks of slots,
    each [b, g, s, h] (heads-major, as the cache stores them), where `mask` [b, 1, t, s] over all the
    chunks' slots lets them see."""
    return _token_major(_attend(_heads_major_queries(q, k[0].shape[1]), k, v, scale, mask, softcap))


def _heads_major_queries(q: Array, G: int) -> Array:
    """q [b, t, n, h] -> [b, g, Q, t, h]: query head n belongs to group n // Q. Per (b, g) one batched
    matmul then serves the Q query heads of the group."""
    B, T, N, hs = q.shape
    return q.reshape(B, T, G, N // G, hs).transpose(0, 2, 3, 1, 4)


def _token_major(out: Array) -> Array:
    """[b, g, Q, t, h] -> [b, t, n, h]."""
    B, G, Q, T, hs = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, G * Q, hs)


QUERY_BLOCKS = 4


def _attend(q: Array, ks: list[Array], vs: list[Array], scale: float, mask: Array, softcap: float | None) -> Array:
    """softmax(q k^T * scale where mask) v for q [b, g, Q, t, h] (Q query heads per group), the keys and
    values as consecutive chunks along s (each [b, g, s, h]), mask broadcastable to [b, 1, t, s];
    -> [b, g, Q, t, h]."""
    B, G, Q, T, hs = q.shape
    q = q.reshape(B, G, Q * T, hs)
    scores = jnp.concatenate([jnp.einsum("bgmh,bgsh->bgms", q, kc) for kc in ks], axis=-1)
    scores = scores.astype(compute_dtype(q.dtype)) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    mask = jnp.tile(mask, (1, 1, Q, 1))  # [b or 1, 1, Q*t, s]: every query head of a group sees the same keys
    probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1).astype(vs[0].dtype)
    ends = np.cumsum([vc.shape[2] for vc in vs])
    outs = [jnp.einsum("bgms,bgsh->bgmh", probs[..., end - vc.shape[2]:end], vc)
            for vc, end in zip(vs, ends, strict=True)]
    return functools.reduce(jnp.add, outs).reshape(B, G, Q, T, hs)


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
    kernel: str = "einsum"  # a resolved attention kernel (resolve_attention)

    @nn.compact
    def __call__(self, x: Array, rope: tuple[Array, Array], kind: LayerKind, cache: KVCache | None = None,
                 segment_ids: Array | None = None) -> tuple[Array, KVCache | None]:
        """-> (output, cache). `rope` is (cos, sin), each [tables, B, T, rope_n_elem]; `kind` picks the
        table and the window. With a layer's `cache`, this call's keys and values are written into it
        and the queries attend over all of it."""
        c = self.config
        std, proj_std = init_stds(c)
        B, T, _ = x.shape
        qkv = Linear(
            (c.n_embd,), (c.n_query_groups, c.q_per_kv + 2, c.head_size), ("embed", "heads", None, "kv"),
            c.bias or c.attn_bias, std, self.dtype, self.param_dtype, qkv_lora(c), name="qkv",
        )(x)
        q = qkv[:, :, :, : c.q_per_kv].reshape(B, T, c.n_head, c.head_size)  # head n uses group n // q_per_kv
        k, v = qkv[:, :, :, c.q_per_kv], qkv[:, :, :, c.q_per_kv + 1]
        q, k = self._norm_qk(q, k)
        cos, sin = rope[0][kind.rope_table], rope[1][kind.rope_table]
        q = constrain(apply_rope(q, cos, sin, c.rope_interleave), ACT_HEADS)
        k = constrain(apply_rope(k, cos, sin, c.rope_interleave), ACT_HEADS)
        v = constrain(v, ACT_HEADS)
        if cache is not None:
            cache = cache.write(k, v)
            k, v = ([chunk.astype(q.dtype) for chunk in kv] for kv in cache.read())
        scale = 1.0 / math.sqrt(c.attention_scores_scalar or c.head_size)

        def attend(window: int | None) -> Array:
            if cache is None:
                return causal_attention(q, k, v, scale, window, c.attention_logit_softcapping, self.kernel,
                                        segment_ids)
            return cached_attention(q, k, v, scale, cache.mask(T, window), c.attention_logit_softcapping)

        if c.sliding_window_size is None or kind.windowed is False:
            y = attend(None)
        elif kind.windowed is True:
            y = attend(c.sliding_window_size)
        else:
            y = jax.lax.cond(kind.windowed > 0, lambda: attend(c.sliding_window_size), lambda: attend(None))
        out = Linear(
            (c.n_head, c.head_size), (c.n_embd,), ("heads", "kv", "embed"),
            c.bias, proj_std, self.dtype, self.param_dtype, lora_for(c, "proj"), name="proj",
        )(constrain(y, ACT_HEADS))
        return out, cache

    def _norm_qk(self, q: Array, k: Array) -> tuple[Array, Array]:
        """RMSNorm of queries and keys before RoPE: over each head (Qwen 3, Gemma 3), or over the whole
        projection, all heads together (OLMo 2)."""
        c = self.config
        if not c.norm_qk:
            return q, k
        norm_q = make_norm(c, self.dtype, self.param_dtype, "norm_q", rms=True)
        norm_k = make_norm(c, self.dtype, self.param_dtype, "norm_k", rms=True)
        if c.norm_qk_type == "default":
            return norm_q(q), norm_k(k)
        B, T = q.shape[:2]
        q = norm_q(q.reshape(B, T, -1)).reshape(B, T, c.n_head, c.head_size)
        k = norm_k(k.reshape(B, T, -1)).reshape(B, T, c.n_query_groups, c.head_size)
        return q, k
