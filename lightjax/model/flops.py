"""A model's FLOPs per token of training (model FLOPs, for MFU).

FLOPs per token of one training step (forward + backward), as nanoGPT and the PaLM paper count them:

    6 * N  +  12 * n_layer * n_head * head_size * T

- 6N: each parameter used in a matmul costs 2 FLOPs per token forward and 4 backward. N counts the
  matmul parameters: everything except the input embedding table (a lookup, not a matmul) unless
  the table is tied to the output head, where it is used in a matmul once. Norms and biases are
  included, as nanoGPT includes them; they are a rounding error. In a mixture of experts N counts
  the experts a token uses (n_expert_per_token of n_expert), as MoE papers do.
- 12 L H Q K: attention scores (QK^T) and the weighted sum (AV), 2 * 2 * K * H * Q FLOPs per token
  and layer forward, times 3 for forward + backward, where K is the number of keys a query attends to on
  average. lightjax's MFU counts causal attention, K = (T + 1) / 2 (`causal_keys`: the attended half of the
  T x T square, MaxText's convention), and with document masks the keys the batch's segments allow
  (measured by the train step); `mfu_full_square` beside it counts K = T, the full square (PaLM's count,
  and lightjax's figure before December 2026), so that older figures stay comparable.

MFU (runtime/hardware.py) = achieved model FLOP/s / (peak FLOP/s per device * devices).
Rematerialisation does not count: recomputed FLOPs are the hardware's cost, not the model's.
"""

from __future__ import annotations

from lightjax.model.config import ModelConfig
from lightjax.model.gpt import abstract_params, count_params


def matmul_params(cfg: ModelConfig) -> int:
    """N in 6N: parameters that take part in matmuls (see module docstring)."""
    n = count_params(abstract_params(cfg))
    if cfg.n_expert:  # a token uses n_expert_per_token experts (lightjax computes all: see mlp.LLaMAMoE)
        n -= (cfg.n_expert - cfg.n_expert_per_token) * 3 * cfg.n_embd * cfg.moe_intermediate_size * cfg.n_layer
    return n if cfg.tie_embeddings else n - cfg.padded_vocab_size * cfg.n_embd


def flops_per_token(cfg: ModelConfig, seq_len: int, keys: float | None = None) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`: 2 per weight forward,
    4 backward (gradients of the input and of the weight; LoRA's frozen weights get none), and attention
    over `keys` keys per query (default seq_len: the full square; causal: `causal_keys(seq_len)`)."""
    per_weight = 4 if cfg.lora_r else 6
    keys = seq_len if keys is None else keys
    return per_weight * matmul_params(cfg) + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * keys


def causal_keys(seq_len: int) -> float:
    """The keys a query attends to on average under a causal mask over `seq_len` tokens."""
    return (seq_len + 1) / 2


# The part of each layer's forward pass a remat policy recomputes in the backward pass: its matmuls'
# share (the weights' and the attention's), the rest being elementwise work no FLOP count includes.
REMAT_RECOMPUTES = {"none": (0.0, 0.0), "dots_saveable": (0.0, 0.0),
                    "dots_with_no_batch_dims_saveable": (0.0, 1.0), "full": (1.0, 1.0)}


def work_flops_per_token(cfg: ModelConfig, seq_len: int, remat: str = "none", blockwise: bool = False) -> float:
    """The FLOPs a compiled train step computes per token, which is more than the model's: attention over
    the full T x T square (XLA's and the einsum kernel's; `blockwise` kernels, splash and cuDNN, skip the
    blocks above the diagonal: about half), and the forward matmuls `remat` recomputes in the backward
    pass (full: the layers' weight matmuls and attention again, 2 FLOPs per weight and 4 L H Q K per
    token; dots_with_no_batch_dims_saveable: the attention matmuls). The embedding lookup and the head
    are never recomputed."""
    keys = causal_keys(seq_len) if blockwise else seq_len
    weights, attention = REMAT_RECOMPUTES[remat]
    head = 0 if cfg.tie_embeddings else cfg.padded_vocab_size * cfg.n_embd
    layer_weights = matmul_params(cfg) - head - (cfg.padded_vocab_size * cfg.n_embd if cfg.tie_embeddings else 0)
    attention_fwd = 4 * cfg.n_layer * cfg.n_head * cfg.head_size * keys
    return flops_per_token(cfg, seq_len, keys) + weights * 2 * layer_weights + attention * attention_fwd
