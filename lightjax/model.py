"""A GPT in pure-functional Flax linen, covering LitGPT's GPT-NeoX and Llama block layouts.

Follow a batch: token ids [B, T] -> `wte` embedding [B, T, n_embd] -> n_layer `Block`s (norm, causal
self-attention with RoPE, MLP, residuals; parallel or sequential) -> final norm `ln_f` -> `lm_head`
logits [B, T, padded_vocab_size] in float32.

Parameter names follow LitGPT's (`wte`, `h_{i}.norm_1`, `h_{i}.attn.qkv`, `h_{i}.attn.proj`, `h_{i}.mlp.fc`,
`ln_f`, `lm_head`) so that a LitGPT reader finds their way. Every parameter carries logical axis names
and every activation is constrained with logical names; `lightjax/sharding.py` alone maps them onto
mesh axes. Without a mesh the constraints do nothing.

Decoding passes a `KVCache` (keys and values of every layer) and gets the updated cache back with the
logits: the model itself holds no state (see lightjax/generate.py).

Two layouts of the layer stack exist: `scan_layers=False` gives `h_0 ... h_{L-1}`; `scan_layers=True`
gives one `h` whose leaves have a leading `layers` axis (one compiled block, faster compiles, the
layout MaxText uses). `stack_layers` / `unstack_layers` convert between them.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lightjax.config import ModelConfig

Dtype = Any
Array = jax.Array

# Remat (activation checkpointing) policies by name: what the backward pass may keep from the forward.
REMAT_POLICIES = {
    "none": None,  # no rematerialisation at all
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _compute_dtype(dtype: Dtype) -> Dtype:
    """Norms, softmax-adjacent and RoPE math run in at least float32 (float64 stays float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def _constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
    return nn.with_logical_constraint(x, axes)


class Linear(nn.Module):
    """y = x @ kernel (+ bias), where the kernel may have several input and output axes.

    Written with `self.param` and `dot_general` rather than `nn.DenseGeneral`, whose multi-dimensional
    logically partitioned kernels fail under `jax.set_mesh` (see STACK_NOTES.md).
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]  # logical names of in_shape + out_shape
    use_bias: bool
    init_std: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n_in = len(self.in_shape)
        init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.kernel_axes)
        kernel = self.param("kernel", init, self.in_shape + self.out_shape, self.param_dtype)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
        if self.use_bias:
            init = nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[n_in:])
            y = y + self.param("bias", init, self.out_shape, self.param_dtype).astype(self.dtype)
        return y


class Embedding(nn.Module):
    num_embeddings: int
    features: int
    init_std: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std), ("vocab", "embed"))
        self.embedding = self.param("embedding", init, (self.num_embeddings, self.features), self.param_dtype)

    def __call__(self, tokens: Array) -> Array:
        # Gather the table's fsdp shards before the lookup (as FSDP does for every weight in use);
        # looking up rows of an embed-sharded table makes XLA replicate the result and re-split it.
        table = _constrain(self.embedding, ("vocab", None))
        return jnp.take(table, tokens, axis=0).astype(self.dtype)

    def attend(self, x: Array) -> Array:
        """Logits against the embedding matrix (tied input and output embeddings)."""
        return x @ self.embedding.astype(self.dtype).T


def _norm_param(module: nn.Module, name: str, init: Any, d: int) -> Array:
    return module.param(name, nn.with_logical_partitioning(init, ("norm",)), (d,), module.param_dtype)


class LayerNorm(nn.Module):
    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = _norm_param(self, "scale", nn.initializers.ones, x.shape[-1])
        bias = _norm_param(self, "bias", nn.initializers.zeros, x.shape[-1])
        x = x.astype(_compute_dtype(self.dtype))
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 whatever the compute dtype (as LitGPT and HF do)."""

    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = _norm_param(self, "scale", nn.initializers.ones, x.shape[-1])
        x = x.astype(_compute_dtype(self.dtype))
        y = x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + self.eps) * scale
        return y.astype(self.dtype)


def make_norm(cfg: ModelConfig, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Module:
    cls = {"LayerNorm": LayerNorm, "RMSNorm": RMSNorm}[cfg.norm_class_name]
    return cls(eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, name=name)


# ------------------------------------------------------------------------------------------------
# Rotary position embedding (RoPE), rotate-half convention (GPT-NeoX, Llama, LitGPT, HF).
# ------------------------------------------------------------------------------------------------


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """The rope_n_elem/2 rotation frequencies, with LitGPT's linear or Llama 3.1 adjustments."""
    n = cfg.rope_n_elem
    theta = 1.0 / (cfg.rope_base ** (np.arange(0, n, 2, dtype=np.float32) / np.float32(n)))
    adj = cfg.rope_adjustments
    if adj is not None:
        factor = adj["factor"]
        if "original_max_seq_len" in adj:
            # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth blend between.
            wavelen = 2 * np.pi / theta
            ratio = adj["original_max_seq_len"] / wavelen
            smooth = (ratio - adj["low_freq_factor"]) / (adj["high_freq_factor"] - adj["low_freq_factor"])
            smooth = np.clip(smooth, 0.0, 1.0)
            theta = (1 - smooth) * (theta / factor) + smooth * theta
        else:
            theta = theta / factor  # linear position interpolation
    return theta.astype(np.float32)


def rope_cos_sin(cfg: ModelConfig, positions: Array) -> tuple[Array, Array]:
    """cos and sin of shape positions.shape + (rope_n_elem,), in float32."""
    theta = jnp.asarray(rope_inv_freq(cfg))
    angles = (positions.astype(jnp.float32) / cfg.rope_condense_ratio)[..., None] * theta
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate the first cos.shape[-1] channels of x [B, T, heads, head_size]; the rest pass through."""
    n = cos.shape[-1]
    if n == 0:
        return x
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    x_rope, x_pass = x[..., :n], x[..., n:]
    x32 = x_rope.astype(_compute_dtype(x.dtype))
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    roped = (x32 * cos + rotated * sin).astype(x.dtype)
    return jnp.concatenate([roped, x_pass], axis=-1)


# ------------------------------------------------------------------------------------------------
# Attention, MLPs, Block.
# ------------------------------------------------------------------------------------------------


def causal_attention(q: Array, k: Array, v: Array, scale: float, mask: Array | None = None) -> Array:
    """softmax(q k^T * scale + mask) v for q [B, T, n_head, hs], k and v [B, S, n_groups, hs].

    Without `mask` the mask is causal (S == T) and `jax.nn.dot_product_attention` computes it: cuDNN
    flash attention on GPU, XLA's fused version elsewhere, grouped queries natively. With `mask` (bool,
    broadcastable to [B, 1, T, S]: which keys each query sees, as decoding with a KV cache needs) the
    explicit path below runs instead, measured 2.6x faster for one query against a cache on CPU. So
    does float64 (used to check gradients numerically): the fused version's softmax is float32.
    """
    if mask is None and q.dtype != jnp.float64:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale)
    B, T, N, hs = q.shape
    S, G = k.shape[1], k.shape[2]
    qg = q.reshape(B, T, G, N // G, hs)  # query head n belongs to group n // (N // G)
    scores = jnp.einsum("btgqh,bsgh->bgqts", qg, k).astype(_compute_dtype(q.dtype)) * scale
    mask = jnp.tril(jnp.ones((T, S), dtype=bool)) if mask is None else mask[:, :, None]  # [B, 1, 1, T, S]
    probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1).astype(v.dtype)
    return jnp.einsum("bgqts,bsgh->btgqh", probs, v).reshape(B, T, N, hs)


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


CACHE_AXES = ("layers", "batch", None, "act_heads", "act_kv")  # kv heads over tensor, like the qkv kernel


def _init_stds(cfg: ModelConfig) -> tuple[float, float]:
    """LitGPT's pretraining init: std sqrt(2 / (5 n_embd)) everywhere (the "small init" of
    Nguyen & Salazar), and 1/sqrt(n_embd)/n_layer for the projections back into the residual stream
    so that the residual's variance does not grow with depth."""
    return math.sqrt(2.0 / (5 * cfg.n_embd)), 1.0 / math.sqrt(cfg.n_embd) / cfg.n_layer


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
                 index: Array | None = None, mask: Array | None = None) -> tuple[Array, tuple | None]:
        """-> (output, kv): with a layer's cache `kv` ([B, S, G, hs] each), this call's keys and values
        are written at slots index.. and the queries attend over the cache under `mask`."""
        c = self.config
        std, proj_std = _init_stds(c)
        B, T, _ = x.shape
        qkv = Linear(
            (c.n_embd,), (c.n_query_groups, c.q_per_kv + 2, c.head_size), ("embed", "heads", None, "kv"),
            c.bias, std, self.dtype, self.param_dtype, name="qkv",
        )(x)
        q = qkv[:, :, :, : c.q_per_kv].reshape(B, T, c.n_head, c.head_size)  # head h uses group h // q_per_kv
        k, v = qkv[:, :, :, c.q_per_kv], qkv[:, :, :, c.q_per_kv + 1]
        q = _constrain(apply_rope(q, cos, sin), ("batch", "length", "act_heads", "act_kv"))
        k = _constrain(apply_rope(k, cos, sin), ("batch", "length", "act_heads", "act_kv"))
        v = _constrain(v, ("batch", "length", "act_heads", "act_kv"))
        if kv is not None:
            k, v = (jax.lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype), index, axis=1)
                    for cache, new in zip(kv, (k, v), strict=True))
            kv = (_constrain(k, CACHE_AXES[1:]), _constrain(v, CACHE_AXES[1:]))
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        y = causal_attention(q, k, v, scale=1.0 / math.sqrt(c.head_size), mask=mask)
        y = _constrain(y, ("batch", "length", "act_heads", "act_kv"))
        out = Linear(
            (c.n_head, c.head_size), (c.n_embd,), ("heads", "kv", "embed"),
            c.bias, proj_std, self.dtype, self.param_dtype, name="proj",
        )(y)
        return out, kv


class GptNeoxMLP(nn.Module):
    config: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        std, proj_std = _init_stds(c)
        h = Linear((c.n_embd,), (c.intermediate_size,), ("embed", "mlp"), c.bias, std,
                   self.dtype, self.param_dtype, name="fc")(x)
        h = nn.gelu(h, approximate=c.gelu_approximate == "tanh")
        h = _constrain(h, ("batch", "length", "act_mlp"))
        return Linear((c.intermediate_size,), (c.n_embd,), ("mlp", "embed"), c.bias, proj_std,
                      self.dtype, self.param_dtype, name="proj")(h)


class LLaMAMLP(nn.Module):
    """SwiGLU: proj(silu(fc_1(x)) * fc_2(x))."""

    config: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        std, proj_std = _init_stds(c)
        up = lambda name: Linear((c.n_embd,), (c.intermediate_size,), ("embed", "mlp"), c.bias, std,  # noqa: E731
                                 self.dtype, self.param_dtype, name=name)(x)
        h = _constrain(nn.silu(up("fc_1")) * up("fc_2"), ("batch", "length", "act_mlp"))
        return Linear((c.intermediate_size,), (c.n_embd,), ("mlp", "embed"), c.bias, proj_std,
                      self.dtype, self.param_dtype, name="proj")(h)


MLP_CLASSES = {"GptNeoxMLP": GptNeoxMLP, "LLaMAMLP": LLaMAMLP}


class Block(nn.Module):
    """One transformer layer. Parallel residual (GPT-NeoX): x + attn(norm_1(x)) + mlp(norm_2(x));
    sequential (Llama): x + attn(norm_1(x)), then + mlp(norm_2(.))."""

    config: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    deterministic: bool = True  # a field, not an argument, so that nn.scan/nn.remat see it as static

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, kv: tuple[Array, Array] | None = None,
                 index: Array | None = None, mask: Array | None = None) -> tuple[Array, tuple | None]:
        """-> (x, kv): the layer's output and, when decoding, its updated cache."""
        c = self.config
        dropout = lambda h: nn.Dropout(c.dropout)(h, deterministic=self.deterministic)  # noqa: E731
        mlp = MLP_CLASSES[c.mlp_class_name](c, self.dtype, self.param_dtype, name="mlp")
        x_normed = make_norm(c, self.dtype, self.param_dtype, "norm_1")(x)
        h, kv = CausalSelfAttention(c, self.dtype, self.param_dtype, name="attn")(x_normed, cos, sin, kv, index, mask)
        h = dropout(h)
        if c.parallel_residual:
            if not c.shared_attention_norm:
                x_normed = make_norm(c, self.dtype, self.param_dtype, "norm_2")(x)
            x = x + h + dropout(mlp(x_normed))
        else:
            x = x + h
            x = x + dropout(mlp(make_norm(c, self.dtype, self.param_dtype, "norm_2")(x)))
        return _constrain(x, ("batch", "length", "act_embed")), kv


class GPT(nn.Module):
    """`GPT(cfg).init(rng, tokens)`, `GPT(cfg).apply(variables, tokens)` -> logits [B, T, padded_vocab]."""

    config: ModelConfig
    dtype: Dtype = jnp.float32  # compute dtype of activations and matmuls
    param_dtype: Dtype = jnp.float32  # storage dtype of parameters
    scan_layers: bool = False
    remat: str = "none"  # a key of REMAT_POLICIES

    @nn.compact
    def __call__(self, tokens: Array, positions: Array | None = None, deterministic: bool = True,
                 cache: KVCache | None = None) -> Array | tuple[Array, KVCache]:
        """Logits for `tokens` [B, T]. With a `cache` the tokens fill its slots index..index+T-1 (their
        positions follow from the slots), and the result is (logits, updated cache)."""
        c = self.config
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"GPT.remat={self.remat!r} is not one of {', '.join(map(repr, REMAT_POLICIES))}.")
        B, T = tokens.shape
        if c.block_size < T:
            raise ValueError(f"Sequence length {T} exceeds the model's block_size={c.block_size}.")
        if cache is not None:
            positions = cache.index + jnp.arange(T)[None, :] - cache.start[:, None]
        elif positions is None:
            positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        std, _ = _init_stds(c)

        wte = Embedding(c.padded_vocab_size, c.n_embd, std, self.dtype, self.param_dtype, name="wte")
        x = _constrain(wte(tokens), ("batch", "length", "act_embed"))
        x = nn.Dropout(c.dropout)(x, deterministic=deterministic)
        cos, sin = rope_cos_sin(c, positions)
        x, cache = self._blocks(x, cos, sin, deterministic, cache)
        x = make_norm(c, self.dtype, self.param_dtype, "ln_f")(x)
        if c.tie_embeddings:
            logits = wte.attend(x)
        else:
            logits = Linear((c.n_embd,), (c.padded_vocab_size,), ("embed", "vocab"), c.lm_head_bias, std,
                            self.dtype, self.param_dtype, name="lm_head")(x)
        # float32 logits for a numerically safe softmax cross-entropy, also under bfloat16 compute.
        logits = _constrain(logits.astype(_compute_dtype(self.dtype)), ("batch", "length", "act_vocab"))
        return logits if cache is None else (logits, cache)

    def _blocks(self, x: Array, cos: Array, sin: Array, deterministic: bool,
                cache: KVCache | None) -> tuple[Array, KVCache | None]:
        c = self.config
        kwargs = dict(config=c, dtype=self.dtype, param_dtype=self.param_dtype, deterministic=deterministic)
        block_cls = Block
        if self.remat != "none":
            # Inside scan, CSE cannot merge the recomputation with the forward pass, so skip the guard.
            block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers)
        decode = () if cache is None else (cache.index, cache.mask(x.shape[1]))
        if not self.scan_layers:
            for i in range(c.n_layer):
                kv = None if cache is None else (cache.k[i], cache.v[i])
                x, kv = block_cls(**kwargs, name=f"h_{i}")(x, cos, sin, kv, *decode)
                if cache is not None:  # written back layer by layer: XLA updates the buffer in place
                    cache = cache.replace(k=cache.k.at[i].set(kv[0]), v=cache.v.at[i].set(kv[1]))
        else:
            # The layer stack is one scanned block: x is the carry, a layer's cache is scanned over.
            stack = nn.scan(
                block_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast) + (() if cache is None else (0, nn.broadcast, nn.broadcast)),
                length=c.n_layer,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            kv = None if cache is None else (cache.k, cache.v)
            x, kv = stack(**kwargs, name="h")(x, cos, sin, *(() if cache is None else (kv, *decode)))
            if cache is not None:
                cache = cache.replace(k=kv[0], v=kv[1])
        if cache is not None:
            T = x.shape[1]
            cache = cache.replace(k=_constrain(cache.k, CACHE_AXES), v=_constrain(cache.v, CACHE_AXES),
                                  index=cache.index + T)
        return x, cache


# ------------------------------------------------------------------------------------------------
# Parameter-tree helpers.
# ------------------------------------------------------------------------------------------------


def stack_layers(params: dict, n_layer: int) -> dict:
    """Loop layout (h_0 ... h_{L-1}) -> scan layout (one h with a leading layers axis)."""
    layers = [params[f"h_{i}"] for i in range(n_layer)]
    out = {k: v for k, v in params.items() if not k.startswith("h_")}
    out["h"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return out


def unstack_layers(params: dict) -> dict:
    """Scan layout -> loop layout; the inverse of `stack_layers`."""
    n_layer = jax.tree.leaves(params["h"])[0].shape[0]
    out = {k: v for k, v in params.items() if k != "h"}
    for i in range(n_layer):
        out[f"h_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["h"])
    return out


def count_params(params: Any) -> int:
    """Number of scalars in a (possibly abstract or boxed) parameter tree."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(params)))


def abstract_params(cfg: ModelConfig, scan_layers: bool = False, **model_kwargs: Any) -> Any:
    """Shapes, dtypes and logical axes of the parameters, without allocating them."""
    model = GPT(cfg, scan_layers=scan_layers, **model_kwargs)
    tokens = jax.ShapeDtypeStruct((1, min(8, cfg.block_size)), jnp.int32)
    return jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)["params"]
