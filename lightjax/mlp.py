"""The feed-forward halves of a block: GELU MLP (GPT-NeoX, Phi, Falcon), SwiGLU (Llama), GeGLU (Gemma)
and the mixture of SwiGLU experts (Mixtral)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lightjax.layers import Array, Dtype, Linear, compute_dtype, constrain, init_stds
from lightjax.lora import lora_for
from lightjax.model_config import ModelConfig

ACT_MLP = ("batch", "length", "act_mlp")


def gelu(x: Array, approximate: bool = False) -> Array:
    """GELU, exact as x/2 (1 + erf(x/sqrt 2)) (PyTorch's formula) or the tanh approximation.

    jax.nn.gelu's exact form goes through erfc, whose two branches XLA:CPU evaluates both of for
    every element: one erf is half the element-wise work of the MLP's activation, forward and back.
    """
    if approximate:
        return nn.gelu(x, approximate=True)
    return 0.5 * x * (1 + jax.lax.erf(x * 0.7071067811865476))


class GptNeoxMLP(nn.Module):
    """proj(gelu(fc(x)))."""

    config: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        std, proj_std = init_stds(c)
        h = Linear((c.n_embd,), (c.intermediate_size,), ("embed", "mlp"), c.bias, std,
                   self.dtype, self.param_dtype, lora_for(c, "mlp"), name="fc")(x)
        h = constrain(gelu(h, c.gelu_approximate == "tanh"), ACT_MLP)
        return Linear((c.intermediate_size,), (c.n_embd,), ("mlp", "embed"), c.bias, proj_std,
                      self.dtype, self.param_dtype, lora_for(c, "mlp"), name="proj")(h)


class LLaMAMLP(nn.Module):
    """Gated: proj(act(fc_1(x)) * fc_2(x)), act = silu (SwiGLU, Llama) or gelu (GeGLU, Gemma)."""

    config: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def activation(self, h: Array) -> Array:
        return nn.silu(h)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        std, proj_std = init_stds(c)
        fc_1, fc_2 = (Linear((c.n_embd,), (c.intermediate_size,), ("embed", "mlp"), c.bias, std,
                             self.dtype, self.param_dtype, lora_for(c, "mlp"), name=name) for name in ("fc_1", "fc_2"))
        h = constrain(self.activation(fc_1(x)) * fc_2(x), ACT_MLP)
        return Linear((c.intermediate_size,), (c.n_embd,), ("mlp", "embed"), c.bias, proj_std,
                      self.dtype, self.param_dtype, lora_for(c, "mlp"), name="proj")(h)


class GemmaMLP(LLaMAMLP):
    def activation(self, h: Array) -> Array:
        return gelu(h, self.config.gelu_approximate == "tanh")


class LLaMAMoE(nn.Module):
    """Mixtral's sparse MoE: a router picks n_expert_per_token of n_expert SwiGLU experts per token and
    mixes their outputs with the softmax of the picked router logits.

    The experts are one stacked kernel per projection ([n_expert, n_embd, moe_intermediate_size], the
    leading `expert` axis sharded over the mesh by the rules in sharding.py) and run as einsums over
    that axis, not a Python loop. Every expert processes every token and the unpicked ones are
    weighted 0: exact (no capacity, no dropped tokens, so logits equal Hugging Face's) and simple to
    shard (expert-parallel: each device runs its experts and the mix is one reduction), at
    n_expert / n_expert_per_token times the MLP FLOPs of a grouped (ragged) dispatch.
    """

    config: ModelConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        std, proj_std = init_stds(c)
        E, m = c.n_expert, c.moe_intermediate_size
        router = Linear((c.n_embd,), (E,), ("embed", None), False, std, self.dtype, self.param_dtype, name="gate")(x)
        top_logits, top_idx = jax.lax.top_k(router.astype(compute_dtype(self.dtype)), c.n_expert_per_token)
        top_probs = jax.nn.softmax(top_logits, axis=-1)
        # [B, T, E]: a token's weight for each expert, zero for the experts it did not pick.
        weights = jnp.sum(jax.nn.one_hot(top_idx, E, dtype=top_probs.dtype) * top_probs[..., None], axis=-2)
        weights = constrain(weights.astype(self.dtype), ("batch", "length", "act_expert"))

        def kernel(name: str, shape: tuple[int, ...], axes: tuple[str, ...], std: float) -> Array:
            init = nn.with_logical_partitioning(nn.initializers.normal(std), axes)
            return self.param(name, init, shape, self.param_dtype).astype(self.dtype)

        fc_1 = kernel("fc_1", (E, c.n_embd, m), ("expert", "embed", "expert_mlp"), std)
        fc_2 = kernel("fc_2", (E, c.n_embd, m), ("expert", "embed", "expert_mlp"), std)
        proj = kernel("proj", (E, m, c.n_embd), ("expert", "expert_mlp", "embed"), proj_std)
        x = x.astype(self.dtype)
        h = nn.silu(jnp.einsum("btd,edm->btem", x, fc_1)) * jnp.einsum("btd,edm->btem", x, fc_2)
        h = constrain(h * weights[..., None], ("batch", "length", "act_expert", "act_expert_mlp"))
        return jnp.einsum("btem,emd->btd", h, proj)


# The modules that config.mlp_class_name names.
MLP_MODULES = {"GptNeoxMLP": GptNeoxMLP, "LLaMAMLP": LLaMAMLP, "GemmaMLP": GemmaMLP, "LLaMAMoE": LLaMAMoE}
