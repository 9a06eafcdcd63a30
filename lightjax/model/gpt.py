"""A GPT in pure-functional Flax linen, covering LitGPT's architecture surface (GPT-NeoX, Llama,
Mistral/Mixtral, Phi, Gemma 1-3, Qwen 2-3, OLMo 2, Falcon) through the fields of `ModelConfig`.

Follow a batch: token ids [B, T] -> `wte` embedding [B, T, n_embd] -> n_layer `Block`s (norm, causal
self-attention with RoPE in attention.py, MLP or experts in mlp.py, residuals; parallel or sequential)
-> final norm `ln_f` -> `lm_head` logits [B, T, padded_vocab_size] in float32. The small parts
(linear layers, norms, RoPE) are in layers.py.

Parameter names follow LitGPT's (`wte`, `h_{i}.norm_1`, `h_{i}.attn.qkv`, `h_{i}.attn.proj`, `h_{i}.mlp.fc`,
`ln_f`, `lm_head`) so that a LitGPT reader finds their way. Every parameter carries logical axis names
and every activation is constrained with logical names; `lightjax/runtime/sharding.py` alone maps them onto
mesh axes. Without a mesh the constraints do nothing.

Each block gets one argument for what sets its layer apart (`LayerKind`: sliding window or not, local
RoPE or not) and, when decoding, one for its state (its slice of the `KVCache`). Decoding passes the
cache of every layer and gets the updated cache back with the logits: the model itself holds no state
(see lightjax/model/generate.py).

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

from lightjax.model.attention import CausalSelfAttention, LayerKind, causal_attention, resolve_attention
from lightjax.model.config import ModelConfig
from lightjax.model.kv_cache import KVCache
from lightjax.model.layers import (
    Array,
    Dropout,
    Dtype,
    Embedding,
    Linear,
    compute_dtype,
    constrain,
    init_stds,
    make_norm,
    rope_cos_sin,
)
from lightjax.model.lora import lora_for
from lightjax.model.mlp import MLP_MODULES

__all__ = ["GPT", "Block", "KVCache", "LayerKind", "causal_attention", "REMAT_POLICIES", "stack_layers",
           "unstack_layers", "count_params", "abstract_params"]

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
    attention: str = "einsum"  # a resolved attention kernel

    @nn.compact
    def __call__(self, x: Array, rope: tuple[Array, Array], kind: LayerKind, cache: KVCache | None = None,
                 segment_ids: Array | None = None) -> tuple[Array, KVCache | None]:
        """-> (x, cache): the layer's output and, when decoding, its updated cache. `rope` is
        (cos, sin), each [tables, B, T, rope_n_elem]: table 0 global, table 1 local; `segment_ids` [B, T]
        keep attention inside each document of a packed row."""
        c = self.config
        mlp = MLP_MODULES[c.mlp_class_name](c, self.dtype, self.param_dtype, name="mlp")
        x_normed = self._norm("norm_1")(x) if c.norm_1 else x
        attention = CausalSelfAttention(c, self.dtype, self.param_dtype, self.attention, name="attn")
        h, cache = attention(x_normed, rope, kind, cache, segment_ids)
        if c.post_attention_norm:
            h = self._norm("post_attention_norm")(h)
        h = self._dropout(h)
        if c.parallel_residual:
            if not c.shared_attention_norm:
                x_normed = self._norm("norm_2")(x) if c.norm_2 else x
            x = x + h + self._dropout(self._post_mlp(mlp(x_normed)))
        else:
            x = x + h
            x = x + self._dropout(self._post_mlp(mlp(self._norm("norm_2")(x) if c.norm_2 else x)))
        return constrain(x, ("batch", "length", "act_embed")), cache

    def _norm(self, name: str) -> nn.Module:
        return make_norm(self.config, self.dtype, self.param_dtype, name)

    def _dropout(self, h: Array) -> Array:
        return Dropout(self.config.dropout)(h, deterministic=self.deterministic)

    def _post_mlp(self, h: Array) -> Array:
        return self._norm("post_mlp_norm")(h) if self.config.post_mlp_norm else h


class GPT(nn.Module):
    """`GPT(cfg).init(rng, tokens)`, `GPT(cfg).apply(variables, tokens)` -> logits [B, T, padded_vocab];
    `GPT(cfg).apply(variables, tokens, cache, method="decode")` -> (logits, the updated cache)."""

    config: ModelConfig
    dtype: Dtype = jnp.float32  # compute dtype of activations and matmuls
    param_dtype: Dtype = jnp.float32  # storage dtype of parameters
    scan_layers: bool = False
    remat: str = "none"  # a key of REMAT_POLICIES
    attention: str = "auto"  # an attention kernel (attention.ATTENTION_KERNELS), resolved when traced

    def __call__(self, tokens: Array, positions: Array | None = None, deterministic: bool = True,
                 segment_ids: Array | None = None) -> Array:
        """Logits [B, T, padded_vocab_size] (float32) of `tokens` [B, T] at `positions` (default 0..T-1);
        with `segment_ids` [B, T] a token attends only to earlier tokens of its own segment (the documents
        of a packed row); with `deterministic=False` dropout is active (a 'dropout' rng)."""
        return self.forward(tokens, positions, deterministic, None, segment_ids)[0]

    def decode(self, tokens: Array, cache: KVCache) -> tuple[Array, KVCache]:
        """(logits, cache): `tokens` [B, T] fill the cache's slots index..index+T-1 (their positions follow
        from the slots) and attend over everything the cache holds."""
        logits, cache = self.forward(tokens, None, True, cache)
        return logits, cache

    @nn.compact
    def forward(self, tokens: Array, positions: Array | None, deterministic: bool, cache: KVCache | None,
                segment_ids: Array | None = None) -> tuple[Array, KVCache | None]:
        """The model: (logits, cache), the cache None when there is none. Call it as GPT or GPT.decode."""
        c = self.config
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"GPT.remat={self.remat!r} is not one of {', '.join(map(repr, REMAT_POLICIES))}.")
        B, T = tokens.shape
        if c.block_size < T:
            raise ValueError(f"Sequence length {T} exceeds the model's block_size={c.block_size}.")
        if cache is not None:
            index = cache.index if jnp.ndim(cache.index) == 0 else cache.index[:, None]  # one slot, or each row's
            positions = index + jnp.arange(T)[None, :] - cache.start[:, None]
        elif positions is None:
            positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        std, _ = init_stds(c)

        wte = Embedding(c.padded_vocab_size, c.n_embd, std, self.dtype, self.param_dtype, name="wte")
        x = wte(tokens)
        if c.scale_embeddings:  # Gemma; the factor is rounded to the compute dtype, as in HF
            x = x * jnp.asarray(math.sqrt(c.n_embd), self.dtype)
        x = constrain(x, ("batch", "length", "act_embed"))
        x = Dropout(c.dropout)(x, deterministic=deterministic)
        tables = [rope_cos_sin(c, positions)]
        if c.rope_indices is not None:
            tables.append(rope_cos_sin(c, positions, local=True))
        rope = tuple(jnp.stack(t) for t in zip(*tables, strict=True))
        x, cache = self._blocks(x, rope, deterministic, cache, segment_ids)
        x = make_norm(c, self.dtype, self.param_dtype, "ln_f")(x)
        if c.tie_embeddings:
            logits = wte.attend(x)
        else:
            logits = Linear((c.n_embd,), (c.padded_vocab_size,), ("embed", "vocab"), c.lm_head_bias, std,
                            self.dtype, self.param_dtype, lora_for(c, "head"), name="lm_head")(x)
        # float32 logits for a numerically safe softmax cross-entropy, also under bfloat16 compute.
        logits = logits.astype(compute_dtype(self.dtype))
        if c.final_logit_softcapping is not None:
            logits = jnp.tanh(logits / c.final_logit_softcapping) * c.final_logit_softcapping
        return constrain(logits, ("batch", "length", "act_vocab")), cache

    def _blocks(self, x: Array, rope: tuple[Array, Array], deterministic: bool, cache: KVCache | None,
                segment_ids: Array | None) -> tuple[Array, KVCache | None]:
        c, L = self.config, self.config.n_layer
        kinds = [LayerKind(c.sliding_window(i) is not None, c.local_rope(i)) for i in range(L)]
        uniform = len(set(kinds)) == 1
        block_cls = Block
        if self.remat != "none":
            # A layer's kind, when known, stays a Python value (static) so the layer compiles for it.
            # Inside scan, CSE cannot merge the recomputation with the forward pass, so skip the guard.
            block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers,
                                 static_argnums=(3,) if uniform or not self.scan_layers else ())
        kernel = self.attention  # as resolved by whoever built the model (train/run.py), or 'auto' here:
        if kernel == "auto":
            kernel = resolve_attention(kernel, c, self.dtype, segments=segment_ids is not None, seq_len=x.shape[1])[0]
        block_args = dict(config=c, dtype=self.dtype, param_dtype=self.param_dtype, deterministic=deterministic,
                          attention=kernel)
        if not self.scan_layers:
            for i, kind in enumerate(kinds):
                layer_cache = None if cache is None else cache.replace(layer=i)
                x, cache = block_cls(**block_args, name=f"h_{i}")(x, rope, kind, layer_cache, segment_ids)
        else:
            # The layer stack is one scanned block: x and the cache are the carry (each layer writes
            # its slots of the cache in place), the layer's index is scanned over, and so are the
            # layers' kinds when they differ (Gemma 2/3's local and global layers).
            kind = kinds[0] if uniform else LayerKind(windowed=jnp.asarray([k.windowed for k in kinds], jnp.int32),
                                                      local_rope=jnp.asarray([k.local_rope for k in kinds], jnp.int32))
            stack = nn.scan(
                _scanned_layer,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast if uniform else 0, 0, nn.broadcast),
                length=L,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            (x, cache), _ = stack(block_cls(**block_args, name="h"), (x, cache), rope, kind, jnp.arange(L), segment_ids)
        if cache is not None:
            cache = cache.replace(layer=0, index=cache.index + x.shape[1])
        return x, cache


def _scanned_layer(block: Block, carry: tuple[Array, KVCache | None], rope: tuple[Array, Array], kind: LayerKind,
                   layer: Array, segment_ids: Array | None) -> tuple[tuple[Array, KVCache | None], None]:
    """One step of the scanned layer stack: (x, cache) -> the layer's (x, cache)."""
    x, cache = carry
    return block(x, rope, kind, None if cache is None else cache.replace(layer=layer), segment_ids), None


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
