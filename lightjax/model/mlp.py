"""The feed-forward halves of a block: GELU MLP (GPT-NeoX, Phi, Falcon), SwiGLU (Llama), GeGLU (Gemma)
and the mixture of SwiGLU experts (Mixtral)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lightjax.model.config import ModelConfig
from lightjax.model.layers import Array, Dtype, Linear, compute_dtype, constrain, init_stds
from lightjax.model.lora import lora_for

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
    leading `expert` axis sharded over the mesh by the rules in runtime/sharding.py). Both dispatches are exact
    (no capacity, no dropped tokens, so logits equal Hugging Face's):
    - "grouped" (`grouped_experts`): each expert runs over the tokens that picked it, n_expert_per_token
      expert MLPs per token;
    - "dense": every expert runs over every token as einsums over the expert axis and the unpicked
      ones are weighted 0: n_expert / n_expert_per_token times the FLOPs, but simple to shard
      (expert-parallel: each device runs its experts and the mix is one reduction), where the grouped
      dispatch gathers the tokens of all batch shards and each expert's weights.
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

        def kernel(name: str, shape: tuple[int, ...], axes: tuple[str, ...], std: float) -> Array:
            init = nn.with_logical_partitioning(nn.initializers.normal(std), axes)
            return self.param(name, init, shape, self.param_dtype).astype(self.dtype)

        fc_1 = kernel("fc_1", (E, c.n_embd, m), ("expert", "embed", "expert_mlp"), std)
        fc_2 = kernel("fc_2", (E, c.n_embd, m), ("expert", "embed", "expert_mlp"), std)
        proj = kernel("proj", (E, m, c.n_embd), ("expert", "expert_mlp", "embed"), proj_std)
        x = x.astype(self.dtype)
        if c.moe_dispatch == "grouped":
            return grouped_experts(x, top_idx, top_probs.astype(self.dtype), fc_1, fc_2, proj)
        # [B, T, E]: a token's weight for each expert, zero for the experts it did not pick.
        weights = jnp.sum(jax.nn.one_hot(top_idx, E, dtype=top_probs.dtype) * top_probs[..., None], axis=-2)
        weights = constrain(weights.astype(self.dtype), ("batch", "length", "act_expert"))
        h = nn.silu(jnp.einsum("btd,edm->btem", x, fc_1)) * jnp.einsum("btd,edm->btem", x, fc_2)
        h = constrain(h * weights[..., None], ("batch", "length", "act_expert", "act_expert_mlp"))
        return jnp.einsum("btem,emd->btd", h, proj)


def grouped_experts(x: Array, expert: Array, weight: Array, fc_1: Array, fc_2: Array, proj: Array) -> Array:
    """sum over k of weight[b, t, k] * SwiGLU expert expert[b, t, k] of x[b, t], each expert run once
    over the tokens that picked it.

    The (token, expert) picks are sorted by expert and laid out in blocks of `rows` rows, each expert's
    picks padded to whole blocks, so that every block belongs to one expert; a scan over the blocks runs
    a block through its expert's MLP, and skips the blocks past the last pick. Blocks are sized to the
    picks per expert: a decode step of one token reads the weights of its experts only, a training
    batch runs n_expert_per_token expert MLPs per token plus at most one partial block per expert.
    """
    B, T, d = x.shape
    E, K = fc_1.shape[0], expert.shape[-1]
    picks = B * T * K
    rows = min(128, max(8, 1 << (max(picks // E, 1) - 1).bit_length()))
    n_blocks = -(-picks // rows) + E  # each expert's partial block adds at most one
    expert = expert.reshape(picks)
    order = jnp.argsort(expert, stable=True)  # pick j = token * K + k
    sorted_expert = expert[order]
    counts = jnp.bincount(expert, length=E)
    padded = -(-counts // rows) * rows
    padded_end = jnp.cumsum(padded)
    # Each sorted pick's row in the blocks: its expert's first row plus its rank among that expert's picks.
    row = (padded_end - padded)[sorted_expert] + jnp.arange(picks) - (jnp.cumsum(counts) - counts)[sorted_expert]
    blocks = jnp.zeros((n_blocks * rows, d), x.dtype).at[row].set(x.reshape(B * T, d)[order // K])
    block_start = jnp.arange(n_blocks) * rows
    block_expert = jnp.minimum(jnp.searchsorted(padded_end, block_start, side="right"), E - 1)

    used = block_start < padded_end[-1]
    out = _expert_blocks(blocks.reshape(n_blocks, rows, d), block_expert, used, fc_1, fc_2, proj)
    # Back to pick order (a gather by the inverse permutation), weighted, summed over each token's picks.
    per_pick = out.reshape(n_blocks * rows, d)[row[jnp.argsort(order)]].reshape(B, T, K, d)
    return jnp.sum(per_pick * weight[..., None], axis=2)


@jax.custom_vjp
def _expert_blocks(blocks: Array, block_expert: Array, used: Array, fc_1: Array, fc_2: Array, proj: Array) -> Array:
    """[n_blocks, rows, d] -> [n_blocks, rows, d]: each used block through its expert's SwiGLU MLP, the
    others zero."""
    def run_block(_: None, block: tuple[Array, Array, Array]) -> tuple[None, Array]:
        x, e, use = block

        def mlp() -> Array:
            w_1, w_2, w_p = _expert_weights(e, fc_1, fc_2, proj)
            a, b = _gates(x, w_1, w_2)
            return (nn.silu(a) * b) @ w_p

        return None, jax.lax.cond(use, mlp, lambda: jnp.zeros_like(x))

    return jax.lax.scan(run_block, None, (blocks, block_expert, used))[1]


def _expert_weights(e: Array, *kernels: Array) -> tuple[Array, ...]:
    return tuple(jax.lax.dynamic_index_in_dim(w, e, keepdims=False) for w in kernels)


def _gates(x: Array, w_1: Array, w_2: Array) -> tuple[Array, Array]:
    """The two projections of a SwiGLU expert, silu(a) * b its hidden activation."""
    return x @ w_1, x @ w_2


def _expert_blocks_fwd(blocks, block_expert, used, fc_1, fc_2, proj):
    return _expert_blocks(blocks, block_expert, used, fc_1, fc_2, proj), (blocks, block_expert, used, fc_1, fc_2, proj)


def _expert_blocks_bwd(saved, g_out):
    """The gradients block by block, each expert's weight gradients added into its own slice: autodiff
    of the scan would add a full-size gradient of every expert's weights per block."""
    blocks, block_expert, used, fc_1, fc_2, proj = saved

    def block_grads(grads: tuple[Array, ...], block: tuple[Array, ...]) -> tuple[tuple[Array, ...], Array]:
        x, e, use, g = block

        def grads_of_block() -> tuple[tuple[Array, ...], Array]:
            w_1, w_2, w_p = _expert_weights(e, fc_1, fc_2, proj)
            a, b = _gates(x, w_1, w_2)
            sig = jax.nn.sigmoid(a)
            silu = a * sig
            g_h = g @ w_p.T
            g_a = g_h * b * sig * (1 + a * (1 - sig))
            g_b = g_h * silu
            block = (x.T @ g_a, x.T @ g_b, (silu * b).T @ g)
            added = tuple(jax.lax.dynamic_update_index_in_dim(acc, jax.lax.dynamic_index_in_dim(acc, e) + gw[None],
                                                               e, 0) for acc, gw in zip(grads, block, strict=True))
            return added, g_a @ w_1.T + g_b @ w_2.T

        return jax.lax.cond(use, grads_of_block, lambda: (grads, jnp.zeros_like(x)))

    zeros = tuple(jnp.zeros_like(w) for w in (fc_1, fc_2, proj))
    grads, g_blocks = jax.lax.scan(block_grads, zeros, (blocks, block_expert, used, g_out))
    return (g_blocks, None, None, *grads)


_expert_blocks.defvjp(_expert_blocks_fwd, _expert_blocks_bwd)


# The modules that config.mlp_class_name names.
MLP_MODULES = {"GptNeoxMLP": GptNeoxMLP, "LLaMAMLP": LLaMAMLP, "GemmaMLP": GemmaMLP, "LLaMAMoE": LLaMAMoE}
