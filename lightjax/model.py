"""A GPT in pure-functional Flax linen, covering LitGPT's architecture surface (GPT-NeoX, Llama,
Mistral/Mixtral, Phi, Gemma 1-3, Qwen 2-3, OLMo 2, Falcon) through the fields of `ModelConfig`.

Follow a batch: token ids [B, T] -> `wte` embedding [B, T, n_embd] -> n_layer `Block`s (norm, causal
self-attention with RoPE in attention.py, MLP or experts in mlp.py, residuals; parallel or sequential)
-> final norm `ln_f` -> `lm_head` logits [B, T, padded_vocab_size] in float32. The small parts
(linear layers, norms, RoPE) are in layers.py.

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
import jax
import jax.numpy as jnp

from lightjax.attention import CACHE_AXES, CausalSelfAttention, KVCache, causal_attention
from lightjax.layers import (
    Array,
    Dtype,
    Embedding,
    Linear,
    compute_dtype,
    constrain,
    init_stds,
    make_norm,
    rope_cos_sin,
)
from lightjax.mlp import MLP_CLASSES
from lightjax.model_config import ModelConfig

__all__ = ["GPT", "Block", "KVCache", "causal_attention", "REMAT_POLICIES", "stack_layers", "unstack_layers",
           "count_params", "abstract_params"]

# Remat (activation checkpointing) policies by name: what the backward pass may keep from the forward.
REMAT_POLICIES = {
    "none": None,  # no rematerialisation at all
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
    """One transformer layer. Parallel residual (GPT-NeoX, Phi, Falcon): x + attn(norm_1(x)) +
    mlp(norm_2(x)), norm_2 shared with norm_1 when shared_attention_norm; sequential (Llama):
    x + attn(norm_1(x)), then + mlp(norm_2(.)). Gemma 2/3 and OLMo 2 also norm each branch's output
    (post_attention_norm, post_mlp_norm); OLMo 2 has no norm_1/norm_2."""

    config: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    deterministic: bool = True  # a field, not an argument, so that nn.scan/nn.remat see it as static
    window: int | None = None  # this layer's attention window (sliding_window_size), None: unbounded
    local_rope: bool = False  # this layer uses the local RoPE table (Gemma 3)

    @nn.compact
    def __call__(self, x: Array, rope: tuple[Array, Array], kv: tuple[Array, Array] | None = None,
                 index: Array | None = None, mask: Array | None = None,
                 layer_flags: Array | None = None) -> tuple[Array, tuple | None]:
        """-> (x, kv): the layer's output and, when decoding, its updated cache. `rope` is (cos, sin),
        each [tables, B, T, rope_n_elem]: table 0 global, table 1 local. `layer_flags` ([2] int32:
        windowed or not, local rope or not) replaces `window`/`local_rope` in a scanned stack whose
        layers differ; attention then picks its kernel per layer at run time."""
        c = self.config
        window, table, window_on = self.window, int(self.local_rope), None
        if layer_flags is not None:
            window, window_on, table = c.sliding_window_size, layer_flags[0] > 0, layer_flags[1]
        cos, sin = rope[0][table], rope[1][table]
        dropout = lambda h: nn.Dropout(c.dropout)(h, deterministic=self.deterministic)  # noqa: E731
        norm = lambda name: make_norm(c, self.dtype, self.param_dtype, name)  # noqa: E731
        mlp = MLP_CLASSES[c.mlp_class_name](c, self.dtype, self.param_dtype, name="mlp")

        x_normed = norm("norm_1")(x) if c.norm_1 else x
        h, kv = CausalSelfAttention(c, self.dtype, self.param_dtype, name="attn")(
            x_normed, cos, sin, kv, index, mask, window, window_on)
        if c.post_attention_norm:
            h = norm("post_attention_norm")(h)
        h = dropout(h)
        if c.parallel_residual:
            if not c.shared_attention_norm:
                x_normed = norm("norm_2")(x) if c.norm_2 else x
            x = x + h + dropout(self._post_mlp(mlp(x_normed)))
        else:
            x = x + h
            x = x + dropout(self._post_mlp(mlp(norm("norm_2")(x) if c.norm_2 else x)))
        return constrain(x, ("batch", "length", "act_embed")), kv

    def _post_mlp(self, h: Array) -> Array:
        if not self.config.post_mlp_norm:
            return h
        return make_norm(self.config, self.dtype, self.param_dtype, "post_mlp_norm")(h)


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
        std, _ = init_stds(c)

        wte = Embedding(c.padded_vocab_size, c.n_embd, std, self.dtype, self.param_dtype, name="wte")
        x = wte(tokens)
        if c.scale_embeddings:  # Gemma; the factor is rounded to the compute dtype, as in HF
            x = x * jnp.asarray(math.sqrt(c.n_embd), self.dtype)
        x = constrain(x, ("batch", "length", "act_embed"))
        x = nn.Dropout(c.dropout)(x, deterministic=deterministic)
        tables = [rope_cos_sin(c, positions)]
        if c.rope_indices is not None:
            tables.append(rope_cos_sin(c, positions, local=True))
        rope = tuple(jnp.stack(t) for t in zip(*tables, strict=True))
        x, cache = self._blocks(x, rope, deterministic, cache)
        x = make_norm(c, self.dtype, self.param_dtype, "ln_f")(x)
        if c.tie_embeddings:
            logits = wte.attend(x)
        else:
            logits = Linear((c.n_embd,), (c.padded_vocab_size,), ("embed", "vocab"), c.lm_head_bias, std,
                            self.dtype, self.param_dtype, name="lm_head")(x)
        # float32 logits for a numerically safe softmax cross-entropy, also under bfloat16 compute.
        logits = logits.astype(compute_dtype(self.dtype))
        if c.final_logit_softcapping is not None:
            logits = jnp.tanh(logits / c.final_logit_softcapping) * c.final_logit_softcapping
        logits = constrain(logits, ("batch", "length", "act_vocab"))
        return logits if cache is None else (logits, cache)

    def _blocks(self, x: Array, rope: tuple[Array, Array], deterministic: bool,
                cache: KVCache | None) -> tuple[Array, KVCache | None]:
        c = self.config
        kwargs = dict(config=c, dtype=self.dtype, param_dtype=self.param_dtype, deterministic=deterministic)
        block_cls = Block
        if self.remat != "none":
            # Inside scan, CSE cannot merge the recomputation with the forward pass, so skip the guard.
            block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers)
        index, mask = (None, None) if cache is None else (cache.index, cache.mask(x.shape[1]))
        layers = [(c.sliding_window(i), c.local_rope(i)) for i in range(c.n_layer)]
        if not self.scan_layers:
            for i, (window, local) in enumerate(layers):
                kv = None if cache is None else (cache.k[i], cache.v[i])
                x, kv = block_cls(**kwargs, window=window, local_rope=local, name=f"h_{i}")(
                    x, rope, kv, index, mask)
                if cache is not None:  # written back layer by layer: XLA updates the buffer in place
                    cache = cache.replace(k=cache.k.at[i].set(kv[0]), v=cache.v.at[i].set(kv[1]))
        else:
            # The layer stack is one scanned block: x is the carry, a layer's cache is scanned over.
            # Layers that differ (Gemma 2/3's local and global ones) get their settings as scanned data.
            flags = None
            if len(set(layers)) == 1:
                kwargs.update(window=layers[0][0], local_rope=layers[0][1])
            else:
                flags = jnp.asarray([(int(w is not None), int(local)) for w, local in layers], jnp.int32)
            stack = nn.scan(
                block_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, 0, nn.broadcast, nn.broadcast, 0),
                length=c.n_layer,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            kv = None if cache is None else (cache.k, cache.v)
            x, kv = stack(**kwargs, name="h")(x, rope, kv, index, mask, flags)
            if cache is not None:
                cache = cache.replace(k=kv[0], v=kv[1])
        if cache is not None:
            T = x.shape[1]
            cache = cache.replace(k=constrain(cache.k, CACHE_AXES), v=constrain(cache.v, CACHE_AXES),
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
