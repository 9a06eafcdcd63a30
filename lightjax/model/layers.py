"""The building blocks of the model: linear layers, embeddings, norms, dropout and rotary position
embeddings.

Every parameter is declared with logical axis names (`embed`, `heads`, `mlp`, ...) that
`lightjax/runtime/sharding.py` maps onto the mesh; `constrain` does the same for activations.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lightjax.model.config import ModelConfig
from lightjax.model.lora import LoRA

Dtype = Any
Array = jax.Array


def compute_dtype(dtype: Dtype) -> Dtype:
    """Norms, softmax-adjacent and RoPE math run in at least float32 (float64 stays float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def constrain(x: Array, axes: tuple[str | None, ...]) -> Array:
    return nn.with_logical_constraint(x, axes)


def init_stds(cfg: ModelConfig) -> tuple[float, float]:
    """LitGPT's pretraining init: std sqrt(2 / (5 n_embd)) everywhere (the "small init" of
    Nguyen & Salazar), and 1/sqrt(n_embd)/n_layer for the projections back into the residual stream
    so that the residual's variance does not grow with depth."""
    return math.sqrt(2.0 / (5 * cfg.n_embd)), 1.0 / math.sqrt(cfg.n_embd) / cfg.n_layer


class Linear(nn.Module):
    """y = x @ kernel (+ bias), where the kernel may have several input and output axes.

    Written with `self.param` and `dot_general` rather than `nn.DenseGeneral`, whose multi-dimensional
    logically partitioned kernels fail under `jax.set_mesh` in the Flax versions lightjax supports.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]  # logical names of in_shape + out_shape
    use_bias: bool
    init_std: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: LoRA | None = None  # a low-rank adapter beside the kernel (lora.py)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n_in = len(self.in_shape)
        init = nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.kernel_axes)
        kernel = self.param("kernel", init, self.in_shape + self.out_shape, self.param_dtype)
        y = _contract(x.astype(self.dtype), kernel.astype(self.dtype), n_in)
        if self.use_bias:
            init = nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[n_in:])
            y = y + self.param("bias", init, self.out_shape, self.param_dtype).astype(self.dtype)
        if self.lora is not None:
            y = y + self._adapter(x, n_in)
        return y

    def _adapter(self, x: Array, n_in: int) -> Array:
        """alpha / r * dropout(x) A B. The adapters are kept in at least float32 (they are what trains,
        also beside bfloat16 base weights), A initialised as LitGPT's (Kaiming-uniform), B at zero."""
        r, dtype = self.lora.rank, compute_dtype(self.param_dtype)
        a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=-1)
        a = self.param("lora_a", nn.with_logical_partitioning(a_init, self.kernel_axes[:n_in] + (None,)),
                       self.in_shape + (r,), dtype)
        b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, (None,) + self.kernel_axes[n_in:]),
                       (r,) + self.out_shape, dtype)
        # Dropout only while training: the train step passes a dropout key, evaluation and decoding none.
        x = Dropout(self.lora.dropout)(x, deterministic=not self.has_rng("dropout"))
        h = _contract(x.astype(self.dtype), a.astype(self.dtype), n_in)
        return _contract(h, self.lora.mask(b).astype(self.dtype), 1) * jnp.asarray(self.lora.scale, self.dtype)


def _contract(x: Array, kernel: Array, n_in: int) -> Array:
    """x's last n_in axes against the kernel's first n_in."""
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    return jax.lax.dot_general(x, kernel, (contract, ((), ())))


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
        table = constrain(self.embedding, ("vocab", None))
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
        x = x.astype(compute_dtype(self.dtype))
        return _layer_norm(x, scale, bias, self.eps).astype(self.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 whatever the compute dtype (as LitGPT and HF do).
    With `unit_offset` (Gemma) the stored weight w scales by (1 + w) and starts at 0."""

    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    unit_offset: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
        scale = _norm_param(self, "scale", init, x.shape[-1]).astype(compute_dtype(self.dtype))
        x = x.astype(compute_dtype(self.dtype))
        return _rms_norm(x, 1 + scale if self.unit_offset else scale, self.eps).astype(self.dtype)


# The norms' gradients, written out. Autodiff's version is a chain of cheap element-wise ops on the
# incoming gradient, which XLA fuses into every consumer: below each layer the residual stream's
# gradient would be recomputed from all the layers above it (O(layers^2) work, which dominates small
# models on CPU). Dividing by the row's standard deviation, an op XLA does not duplicate, makes each
# layer's input gradient a value computed once. The forward passes are the plain formulas.


def _param_grad(g: Array, like: Array) -> Array:
    return g.sum(tuple(range(g.ndim - 1))).astype(like.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x: Array, scale: Array, bias: Array, eps: float) -> tuple[Array, tuple]:
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    xhat = (x - mean) * jax.lax.rsqrt(var + eps)
    return xhat * scale + bias, (xhat, var, scale, bias)


def _layer_norm_bwd(eps: float, res: tuple, g: Array) -> tuple[Array, Array, Array]:
    xhat, var, scale, bias = res
    gs = g * scale
    dx = (gs - gs.mean(-1, keepdims=True) - xhat * (gs * xhat).mean(-1, keepdims=True)) / jnp.sqrt(var + eps)
    return dx.astype(xhat.dtype), _param_grad(g * xhat, scale), _param_grad(g, bias)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm(x: Array, scale: Array, eps: float) -> Array:
    return _rms_norm_fwd(x, scale, eps)[0]


def _rms_norm_fwd(x: Array, scale: Array, eps: float) -> tuple[Array, tuple]:
    mean_square = jnp.square(x).mean(-1, keepdims=True)
    xhat = x * jax.lax.rsqrt(mean_square + eps)
    return xhat * scale, (xhat, mean_square, scale)


def _rms_norm_bwd(eps: float, res: tuple, g: Array) -> tuple[Array, Array]:
    xhat, mean_square, scale = res
    gs = g * scale
    dx = (gs - xhat * (gs * xhat).mean(-1, keepdims=True)) / jnp.sqrt(mean_square + eps)
    return dx.astype(xhat.dtype), _param_grad(g * xhat, scale)


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def make_norm(cfg: ModelConfig, dtype: Dtype, param_dtype: Dtype, name: str, rms: bool = False) -> nn.Module:
    """The config's norm (`rms`: an RMSNorm whatever the config's class, as q/k norms are)."""
    if rms or cfg.norm_class_name == "RMSNorm":
        return RMSNorm(cfg.norm_eps, dtype, param_dtype, cfg.norm_unit_offset, name=name)
    return LayerNorm(cfg.norm_eps, dtype, param_dtype, name=name)


# ------------------------------------------------------------------------------------------------
# Rotary position embedding (RoPE): rotate-half convention (GPT-NeoX, Llama, LitGPT, HF), or
# rotate-pairs with `rope_interleave`.
# ------------------------------------------------------------------------------------------------


class Dropout(nn.Module):
    """Inverted dropout, as `nn.Dropout`: each element zeroed with probability `rate`, the others scaled
    by 1 / (1 - rate); a no-op when deterministic. The mask takes 16 random bits per element, two from
    each 32-bit word of the generator along the last axis: JAX's threefry costs per word, so this halves
    what the masks cost (they were a fifth of the baseline's CPU step at rate 0.2), and 16 bits keep the
    rate exact to 1/65536."""

    rate: float

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        if deterministic or self.rate == 0.0:
            return x
        return dropout(x, self.rate, self.make_rng("dropout"))


def dropout(x: Array, rate: float, key: Array) -> Array:
    """`x` with each element zeroed with probability `rate` (to 1/65536) and the rest scaled to keep the mean."""
    threshold = round(rate * 65536)
    if x.shape[-1] % 2:  # two elements per word along the last axis
        keep = jax.random.bernoulli(key, 1.0 - threshold / 65536, x.shape)
    else:
        words = jax.random.bits(key, (*x.shape[:-1], x.shape[-1] // 2), jnp.uint32)
        keep = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(x.shape) >= threshold
    return jnp.where(keep, x / jnp.asarray(1.0 - threshold / 65536, x.dtype), jnp.zeros_like(x))


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> tuple[np.ndarray, float]:
    """(the rope_n_elem/2 rotation frequencies, the factor cos and sin are scaled by).

    Global layers use rope_base with the config's linear, Llama 3.1 or YaRN adjustments; Gemma 3's
    local layers use rope_local_base_freq, unadjusted."""
    n = cfg.rope_n_elem
    base = cfg.rope_local_base_freq if local else cfg.rope_base
    exponents = np.arange(0, n, 2, dtype=np.float32) / np.float32(n)
    theta = 1.0 / (np.float32(base) ** exponents)
    adj = None if local else cfg.rope_adjustments
    if adj is None:
        return theta.astype(np.float32), 1.0
    factor = adj["factor"]
    if "beta_fast" in adj:
        return _yarn(theta, adj, n, base)
    if "original_max_seq_len" in adj:
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth blend between.
        wavelen = 2 * np.pi / theta
        ratio = adj["original_max_seq_len"] / wavelen
        smooth = (ratio - adj["low_freq_factor"]) / (adj["high_freq_factor"] - adj["low_freq_factor"])
        smooth = np.clip(smooth, 0.0, 1.0)
        theta = (1 - smooth) * (theta / factor) + smooth * theta
    else:
        theta = theta / factor  # linear position interpolation
    return theta.astype(np.float32), 1.0


def _yarn(theta: np.ndarray, adj: dict, n: int, base: float) -> tuple[np.ndarray, float]:
    """YaRN (Peng et al. 2023): frequencies that turn fewer than beta_slow times over the original
    context are interpolated (divided by factor), those turning more than beta_fast times are kept,
    with a linear ramp between; cos and sin are scaled by 0.1 ln(factor) + 1 ("attention factor")."""
    factor, original = adj["factor"], adj["original_max_seq_len"]

    def dim_of(rotations: float) -> float:  # the channel whose frequency turns `rotations` times
        return n * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(adj["beta_fast"]), dim_of(adj["beta_slow"])
    if adj.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, n - 1)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(n // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
    theta = (theta / factor) * (1 - keep) + theta * keep

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = adj.get("attention_factor")
    if attention_factor is None:
        if adj.get("mscale") and adj.get("mscale_all_dim"):
            attention_factor = mscale(factor, adj["mscale"]) / mscale(factor, adj["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    return theta.astype(np.float32), float(attention_factor)


def rope_cos_sin(cfg: ModelConfig, positions: Array, local: bool = False) -> tuple[Array, Array]:
    """cos and sin of shape positions.shape + (rope_n_elem,), in float32."""
    theta, scale = rope_inv_freq(cfg, local)
    angles = (positions.astype(jnp.float32) / cfg.rope_condense_ratio)[..., None] * jnp.asarray(theta)
    if cfg.rope_interleave:  # channels 2i and 2i+1 turn by the same angle
        angles = jnp.repeat(angles, 2, axis=-1)
    else:  # channels i and i + n/2 do
        angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: Array, cos: Array, sin: Array, interleave: bool = False) -> Array:
    """Rotate the first cos.shape[-1] channels of x [B, T, heads, head_size]; the rest pass through."""
    n = cos.shape[-1]
    if n == 0:
        return x
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    x_rope, x_pass = x[..., :n], x[..., n:]
    x32 = x_rope.astype(compute_dtype(x.dtype))
    if interleave:  # (x0, x1) -> (-x1, x0) for each pair
        pairs = x32.reshape(*x32.shape[:-1], n // 2, 2)
        rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x32.shape)
    else:
        x1, x2 = jnp.split(x32, 2, axis=-1)
        rotated = jnp.concatenate([-x2, x1], axis=-1)
    roped = (x32 * cos + rotated * sin).astype(x.dtype)
    return jnp.concatenate([roped, x_pass], axis=-1)


def causal_mask(q_slot: Array, S: int, window: int | None = None) -> Array:
    """[1, 1, T, S]: query slot q_slot[t] sees key slots <= its own, and with a window the last
    `window` of them only (itself included, as Hugging Face counts)."""
    k_slot = jnp.arange(S)[None, :]
    mask = k_slot <= q_slot[:, None]
    if window is not None:
        mask &= k_slot > q_slot[:, None] - window
    return mask[None, None]
