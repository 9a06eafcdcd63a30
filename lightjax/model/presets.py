"""Named model presets, under LitGPT's names: each is the set of ModelConfig fields that differ from
the defaults. `ModelConfig.from_name(name)` builds one; `ModelConfig.names()` lists them.

Sizes are those of each model's Hugging Face `config.json`; `tests/test_hf_parity.py` checks every
preset's parameter count against `transformers` built from the same config.
"""

from __future__ import annotations

from typing import Any

_PYTHIA = dict(padding_multiple=128)  # GPT-NeoX defaults otherwise: rotary 0.25, parallel residual, bias
_LLAMA = dict(
    rotary_percentage=1.0, parallel_residual=False, bias=False,
    norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP",
)
_LLAMA3 = dict(_LLAMA, rope_base=500000, rope_adjustments=dict(
    factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192))
# Gemma: RMSNorm scaled by (1 + weight), embeddings scaled by sqrt(n_embd), GeGLU MLP, tied head.
_GEMMA = dict(
    _LLAMA, mlp_class_name="GemmaMLP", gelu_approximate="tanh", norm_unit_offset=True, scale_embeddings=True,
    norm_eps=1e-6, tie_embeddings=True, vocab_size=256000, padded_vocab_size=256000, block_size=8192,
)
_PHI = dict(  # parallel attention and MLP over one shared LayerNorm, biases everywhere, partial RoPE
    vocab_size=50257, padded_vocab_size=51200, block_size=2048, shared_attention_norm=True,
    lm_head_bias=True, gelu_approximate="tanh",
)


def _every(n_layer: int, period: int) -> tuple[int, ...]:
    """1 for every layer but each period-th one (Gemma's local layers between global ones)."""
    return tuple(int((i + 1) % period != 0) for i in range(n_layer))


PRESETS: dict[str, dict[str, Any]] = {
    # EleutherAI Pythia (GPT-NeoX architecture).
    "pythia-14m": dict(_PYTHIA, block_size=512, n_layer=6, n_embd=128, n_head=4),
    "pythia-31m": dict(_PYTHIA, block_size=1024, n_layer=6, n_embd=256, n_head=8),
    "pythia-70m": dict(_PYTHIA, block_size=2048, n_layer=6, n_embd=512, n_head=8),
    "pythia-160m": dict(_PYTHIA, block_size=2048, n_layer=12, n_embd=768, n_head=12),
    "pythia-410m": dict(_PYTHIA, block_size=2048, n_layer=24, n_embd=1024, n_head=16),
    "pythia-1b": dict(_PYTHIA, block_size=2048, n_layer=16, n_embd=2048, n_head=8),
    # Stability AI StableLM alpha (GPT-NeoX architecture).
    "stablelm-base-alpha-3b": dict(block_size=4096, n_layer=16, n_embd=4096, n_head=32),
    # Llama family.
    "tiny-llama-1.1b": dict(
        _LLAMA, block_size=2048, vocab_size=32000, padding_multiple=64, n_layer=22, n_head=32,
        n_embd=2048, n_query_groups=4, intermediate_size=5632, norm_eps=1e-5,
    ),
    "SmolLM2-135M": dict(
        _LLAMA, block_size=8192, vocab_size=49152, padded_vocab_size=49152, n_layer=30, n_head=9,
        n_embd=576, n_query_groups=3, intermediate_size=1536, rope_base=100000, norm_eps=1e-5,
        tie_embeddings=True,
    ),
    "SmolLM2-360M": dict(
        _LLAMA, block_size=8192, vocab_size=49152, padded_vocab_size=49152, n_layer=32, n_head=15,
        n_embd=960, n_query_groups=5, intermediate_size=2560, rope_base=100000, norm_eps=1e-5,
        tie_embeddings=True,
    ),
    "Llama-3.2-1B": dict(
        _LLAMA3, block_size=131072, vocab_size=128000, padded_vocab_size=128256, n_layer=16,
        n_head=32, n_embd=2048, n_query_groups=8, intermediate_size=8192, norm_eps=1e-5, tie_embeddings=True,
    ),
    "Llama-3.2-3B": dict(
        _LLAMA3, block_size=131072, vocab_size=128000, padded_vocab_size=128256, n_layer=28,
        n_head=24, n_embd=3072, n_query_groups=8, intermediate_size=8192, norm_eps=1e-5, tie_embeddings=True,
    ),
    "Llama-3.1-8B": dict(
        _LLAMA3, block_size=131072, vocab_size=128000, padded_vocab_size=128256, n_layer=32,
        n_head=32, n_embd=4096, n_query_groups=8, intermediate_size=14336, norm_eps=1e-5,
        rope_adjustments=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192),
    ),
    # Mistral AI: Llama blocks with sliding-window attention; Mixtral replaces the MLP by 8 experts.
    "Mistral-7B-v0.1": dict(
        _LLAMA, block_size=32768, vocab_size=32000, padded_vocab_size=32000, n_layer=32, n_head=32,
        n_embd=4096, n_query_groups=8, intermediate_size=14336, norm_eps=1e-5, sliding_window_size=4096,
    ),
    "Mixtral-8x7B-v0.1": dict(
        _LLAMA, block_size=32768, vocab_size=32000, padded_vocab_size=32000, n_layer=32, n_head=32,
        n_embd=4096, n_query_groups=8, mlp_class_name="LLaMAMoE", intermediate_size=14336,
        moe_intermediate_size=14336, n_expert=8, n_expert_per_token=2, rope_base=1000000, norm_eps=1e-5,
    ),
    # Microsoft Phi.
    "phi-1_5": dict(_PHI, n_layer=24, n_embd=2048, n_head=32, rotary_percentage=0.5),
    "phi-2": dict(_PHI, n_layer=32, n_embd=2560, n_head=32, rotary_percentage=0.4),
    "Phi-3-mini-4k-instruct": dict(
        _LLAMA, block_size=4096, vocab_size=32000, padded_vocab_size=32064, n_layer=32, n_head=32,
        n_embd=3072, intermediate_size=8192, norm_eps=1e-5,
    ),
    # Google Gemma.
    "gemma-2b": dict(_GEMMA, n_layer=18, n_embd=2048, n_head=8, n_query_groups=1, head_size=256,
                     intermediate_size=16384),
    "gemma-2-2b": dict(
        _GEMMA, n_layer=26, n_embd=2304, n_head=8, n_query_groups=4, head_size=256, intermediate_size=9216,
        post_attention_norm=True, post_mlp_norm=True, attention_scores_scalar=256,
        sliding_window_size=4096, sliding_window_indices=_every(26, 2),
        attention_logit_softcapping=50.0, final_logit_softcapping=30.0,
    ),
    "gemma-3-1b-it": dict(
        _GEMMA, block_size=32768, vocab_size=262144, padded_vocab_size=262144, n_layer=26, n_embd=1152,
        n_head=4, n_query_groups=1, head_size=256, intermediate_size=6912, post_attention_norm=True,
        post_mlp_norm=True, norm_qk=True, attention_scores_scalar=256, sliding_window_size=512,
        sliding_window_indices=_every(26, 6), rope_base=1000000, rope_local_base_freq=10000,
        rope_indices=_every(26, 6),
    ),
    # Alibaba Qwen.
    "Qwen2.5-0.5B": dict(
        _LLAMA, block_size=32768, vocab_size=151643, padded_vocab_size=151936, n_layer=24, n_head=14,
        n_embd=896, n_query_groups=2, intermediate_size=4864, attn_bias=True, rope_base=1000000,
        norm_eps=1e-6, tie_embeddings=True,
    ),
    "Qwen3-0.6B": dict(
        _LLAMA, block_size=40960, vocab_size=151643, padded_vocab_size=151936, n_layer=28, n_head=16,
        n_embd=1024, n_query_groups=8, head_size=128, intermediate_size=3072, norm_qk=True,
        rope_base=1000000, norm_eps=1e-6, tie_embeddings=True,
    ),
    # Allen AI OLMo 2: no pre-norms; RMSNorm after attention and MLP, and over the whole q and k projections.
    "OLMo-2-1124-7B": dict(
        _LLAMA, block_size=4096, vocab_size=100278, padded_vocab_size=100352, n_layer=32, n_head=32,
        n_embd=4096, intermediate_size=11008, norm_1=False, norm_2=False, post_attention_norm=True,
        post_mlp_norm=True, norm_qk=True, norm_qk_type="olmo2", rope_base=500000, norm_eps=1e-6,
    ),
    # TII Falcon: parallel attention and MLP over one LayerNorm, multi-query attention, no biases.
    "falcon-7b": dict(
        block_size=2048, vocab_size=65024, padded_vocab_size=65024, n_layer=32, n_head=71, n_embd=4544,
        n_query_groups=1, rotary_percentage=1.0, shared_attention_norm=True, bias=False, tie_embeddings=True,
    ),
    # The baseline of configs/baseline.py: a nanoGPT-sized model with Pythia's block layout, trained
    # char-level on Tiny Shakespeare (65 symbols; the vocabulary is padded to 128 for the MXU/tensor cores).
    "baseline-tiny": dict(
        block_size=256, vocab_size=65, padding_multiple=64, n_layer=6, n_head=6, n_embd=384,
        rotary_percentage=0.25, parallel_residual=True, bias=True,
        norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP",
    ),
}
for _name, _fields in PRESETS.items():
    _fields["name"] = _name
