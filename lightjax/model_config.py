"""Model architecture configuration and named presets.

`ModelConfig` mirrors the field names of LitGPT's `Config` so that a LitGPT user can read a preset
here and recognise it. It holds the architecture only: training, data and mesh settings live in the
ml_collections run configs under `configs/`.

Derived values (`head_size`, `padded_vocab_size`, `n_query_groups`, `intermediate_size`, `rope_n_elem`)
are computed once in `__post_init__`, and every invalid combination is rejected there with a
`ValueError` naming the field, so a model is never built from a config that cannot work.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Literal

from lightjax.presets import PRESETS

NORM_CLASSES = ("LayerNorm", "RMSNorm")
MLP_CLASSES = ("GptNeoxMLP", "LLaMAMLP", "GemmaMLP", "LLaMAMoE")
GELU_APPROXIMATIONS = ("none", "tanh")
NORM_QK_TYPES = ("default", "olmo2")
# rope_adjustments key sets: linear position interpolation, Llama 3.1, YaRN (required keys; YaRN's
# optional ones follow Hugging Face's rope_parameters).
_ROPE_LINEAR = {"factor"}
_ROPE_LLAMA3 = {"factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"}
_ROPE_YARN = {"factor", "original_max_seq_len", "beta_fast", "beta_slow"}
_ROPE_YARN_OPTIONAL = {"attention_factor", "mscale", "mscale_all_dim", "truncate"}


def find_multiple(n: int, k: int) -> int:
    """The smallest multiple of k that is >= n."""
    return n if n % k == 0 else n + k - (n % k)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = ""
    block_size: int = 4096
    vocab_size: int = 50254
    padding_multiple: int = 512
    padded_vocab_size: int | None = None
    n_layer: int = 16
    n_embd: int = 4096
    n_head: int = 32
    head_size: int | None = None
    n_query_groups: int | None = None
    # RoPE: the first `rope_n_elem = rotary_percentage * head_size` channels of each head rotate.
    rotary_percentage: float = 0.25
    rope_base: int | float = 10000
    rope_condense_ratio: int = 1
    # Llama 3.1 style: {factor, low_freq_factor, high_freq_factor, original_max_seq_len};
    # linear scaling: {factor} alone; YaRN: {factor, original_max_seq_len, beta_fast, beta_slow}.
    rope_adjustments: dict[str, float] | None = None
    # Rotate channel pairs (0, 1), (2, 3), ... instead of halves (0, n/2), (1, n/2 + 1), ...
    rope_interleave: bool = False
    # Gemma 3: layers with rope_indices[i] == 1 use base rope_local_base_freq, unscaled.
    rope_local_base_freq: float | None = None
    rope_indices: tuple[int, ...] | None = None
    # Block layout.
    parallel_residual: bool = True
    shared_attention_norm: bool = False
    bias: bool = True  # every linear layer but lm_head
    attn_bias: bool = False  # the qkv projection only (Qwen2)
    lm_head_bias: bool = False
    norm_class_name: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    norm_eps: float = 1e-5
    norm_unit_offset: bool = False  # Gemma: RMSNorm scales by (1 + weight), the weight starting at 0
    norm_1: bool = True  # the norm before attention (OLMo 2 has none)
    norm_2: bool = True  # the norm before the MLP
    post_attention_norm: bool = False  # a norm of the attention output before the residual (Gemma 2/3, OLMo 2)
    post_mlp_norm: bool = False
    norm_qk: bool = False  # RMSNorm of queries and keys: per head ("default") or per projection ("olmo2")
    norm_qk_type: Literal["default", "olmo2"] = "default"
    mlp_class_name: Literal["GptNeoxMLP", "LLaMAMLP", "GemmaMLP", "LLaMAMoE"] = "GptNeoxMLP"
    intermediate_size: int | None = None
    gelu_approximate: str = "none"
    # Mixture of experts (LLaMAMoE): each token goes through n_expert_per_token of n_expert SwiGLU MLPs.
    n_expert: int = 0
    n_expert_per_token: int = 0
    moe_intermediate_size: int | None = None
    # Attention: scores scale 1/sqrt(attention_scores_scalar or head_size); tanh soft-capping of the
    # scores and of the final logits (Gemma 2); a causal window of sliding_window_size keys (itself
    # included) on the layers with sliding_window_indices[i] == 1 (all layers when None).
    attention_scores_scalar: int | None = None
    attention_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window_size: int | None = None
    sliding_window_indices: tuple[int, ...] | None = None
    scale_embeddings: bool = False  # multiply the embeddings by sqrt(n_embd) (Gemma)
    tie_embeddings: bool = False
    dropout: float = 0.0
    # Derived in __post_init__.
    rope_n_elem: int = dataclasses.field(init=False, default=0)
    # The optional fields that __post_init__ filled in, so that `replace` derives them again.
    _derived: frozenset = dataclasses.field(init=False, default=frozenset(), repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        derivable = ("head_size", "padded_vocab_size", "n_query_groups", "intermediate_size")
        set_("_derived", frozenset(k for k in derivable if getattr(self, k) is None))

        for field in ("block_size", "vocab_size", "padding_multiple", "n_layer", "n_embd", "n_head"):
            _require(self, field, getattr(self, field) > 0, "must be a positive integer")
        if self.head_size is None:
            _require(self, "n_embd", self.n_embd % self.n_head == 0,
                     f"must be divisible by n_head={self.n_head} (or set head_size explicitly)")
            set_("head_size", self.n_embd // self.n_head)
        _require(self, "head_size", self.head_size > 0, "must be a positive integer")

        if self.padded_vocab_size is None:
            set_("padded_vocab_size", find_multiple(self.vocab_size, self.padding_multiple))
        else:
            # As in LitGPT: a preset may pin the padded size; the usable vocabulary cannot exceed it.
            set_("vocab_size", min(self.vocab_size, self.padded_vocab_size))

        for field in ("sliding_window_indices", "rope_indices"):  # lists from a JSON or command line
            if isinstance(getattr(self, field), list):
                set_(field, tuple(getattr(self, field)))
        if self.mlp_class_name == "LLaMAMoE" and self.moe_intermediate_size is None:
            set_("moe_intermediate_size", self.intermediate_size)

        if self.n_query_groups is None:
            set_("n_query_groups", self.n_head)
        _require(self, "n_query_groups", 0 < self.n_query_groups <= self.n_head, "must be in [1, n_head]")
        _require(self, "n_head", self.n_head % self.n_query_groups == 0,
                 f"must be divisible by n_query_groups={self.n_query_groups}")

        _require_choice(self, "norm_class_name", NORM_CLASSES)
        _require_choice(self, "mlp_class_name", MLP_CLASSES)
        _require_choice(self, "gelu_approximate", GELU_APPROXIMATIONS)
        if self.intermediate_size is None:
            _require(self, "intermediate_size", self.mlp_class_name == "GptNeoxMLP",
                     f"must be set for mlp_class_name={self.mlp_class_name!r}")
            set_("intermediate_size", 4 * self.n_embd)
        _require(self, "intermediate_size", self.intermediate_size > 0, "must be a positive integer")

        _require(self, "rotary_percentage", 0.0 <= self.rotary_percentage <= 1.0, "must be in [0, 1]")
        rope_n_elem = int(self.rotary_percentage * self.head_size)
        _require(self, "rotary_percentage", rope_n_elem % 2 == 0,
                 f"gives rope_n_elem={rope_n_elem} for head_size={self.head_size}; it must be even")
        set_("rope_n_elem", rope_n_elem)
        _validate_rope_adjustments(self)
        _validate_extensions(self)
        _require(self, "shared_attention_norm", not self.shared_attention_norm or self.parallel_residual,
                 "requires parallel_residual=True (a sequential block has no single input to share a norm of)")
        _require(self, "dropout", 0.0 <= self.dropout < 1.0, "must be in [0, 1)")
        _require(self, "norm_eps", self.norm_eps > 0, "must be positive")

    @property
    def q_per_kv(self) -> int:
        """Query heads that share one key/value head (1 for MHA, n_head for MQA)."""
        return self.n_head // self.n_query_groups

    def sliding_window(self, layer: int) -> int | None:
        """The attention window of layer `layer` (None: the whole causal context)."""
        if self.sliding_window_size is None:
            return None
        use = self.sliding_window_indices is None or self.sliding_window_indices[layer] == 1
        return self.sliding_window_size if use else None

    def local_rope(self, layer: int) -> bool:
        """Whether layer `layer` uses the local RoPE base (Gemma 3)."""
        return self.rope_indices is not None and self.rope_indices[layer] == 1

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """The preset called `name` (LitGPT's names), with any field overridden."""
        if name not in PRESETS:
            close = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(f"Unknown model name {name!r}.{hint} Known names: ModelConfig.names().")
        return cls(**{**PRESETS[name], **overrides})

    @staticmethod
    def names() -> list[str]:
        return sorted(PRESETS)

    def replace(self, **overrides: Any) -> ModelConfig:
        """A copy with fields changed; derived fields are recomputed unless given."""
        fields = {k: (None if k in self._derived else v) for k, v in self.to_dict().items()}
        return type(self)(**{**fields, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def __hash__(self) -> int:  # rope_adjustments is a dict; hash its items so configs can be static args
        return hash(tuple((k, _freeze(v)) for k, v in self.to_dict().items()))


def _freeze(value: Any) -> Any:
    return tuple(sorted(value.items())) if isinstance(value, dict) else value


def _require(cfg: ModelConfig, field: str, ok: bool, why: str) -> None:
    if not ok:
        raise ValueError(f"ModelConfig.{field}={getattr(cfg, field)!r} {why}.")


def _require_choice(cfg: ModelConfig, field: str, choices: tuple[str, ...]) -> None:
    _require(cfg, field, getattr(cfg, field) in choices, f"is not one of {', '.join(map(repr, choices))}")


def _validate_rope_adjustments(cfg: ModelConfig) -> None:
    adj = cfg.rope_adjustments
    if adj is None:
        return
    keys = set(adj) if isinstance(adj, dict) else set()
    ok = keys in (_ROPE_LINEAR, _ROPE_LLAMA3) or _ROPE_YARN <= keys <= _ROPE_YARN | _ROPE_YARN_OPTIONAL
    _require(cfg, "rope_adjustments", ok, f"must have the keys {sorted(_ROPE_LINEAR)} (linear), {sorted(_ROPE_LLAMA3)} "
             f"(Llama 3.1) or {sorted(_ROPE_YARN)} (YaRN, optionally {sorted(_ROPE_YARN_OPTIONAL)})")
    _require(cfg, "rope_adjustments", adj["factor"] > 0, "needs factor > 0")
    if "low_freq_factor" in adj:
        _require(cfg, "rope_adjustments", adj["high_freq_factor"] > adj["low_freq_factor"],
                 "needs high_freq_factor > low_freq_factor")


def _validate_extensions(cfg: ModelConfig) -> None:
    """The fields beyond GPT-NeoX and Llama: each must be consistent with the rest."""
    _require_choice(cfg, "norm_qk_type", NORM_QK_TYPES)
    _require(cfg, "norm_unit_offset", not cfg.norm_unit_offset or cfg.norm_class_name == "RMSNorm",
             "needs norm_class_name='RMSNorm'")
    moe = cfg.mlp_class_name == "LLaMAMoE"
    if moe:
        _require(cfg, "n_expert", cfg.n_expert > 1, "must be > 1 for mlp_class_name='LLaMAMoE'")
        _require(cfg, "n_expert_per_token", 0 < cfg.n_expert_per_token <= cfg.n_expert,
                 f"must be in [1, n_expert={cfg.n_expert}]")
        _require(cfg, "moe_intermediate_size", cfg.moe_intermediate_size > 0, "must be a positive integer")
    else:
        _require(cfg, "n_expert", cfg.n_expert == 0, f"needs mlp_class_name='LLaMAMoE' (is {cfg.mlp_class_name!r})")
    for field in ("attention_scores_scalar", "attention_logit_softcapping", "final_logit_softcapping",
                  "sliding_window_size", "rope_local_base_freq"):
        value = getattr(cfg, field)
        _require(cfg, field, value is None or value > 0, "must be positive (or None)")
    for field, needs in (("sliding_window_indices", "sliding_window_size"), ("rope_indices", "rope_local_base_freq")):
        flags = getattr(cfg, field)
        if flags is None:
            continue
        _require(cfg, field, len(flags) == cfg.n_layer and set(flags) <= {0, 1},
                 f"must hold one 0 or 1 per layer (n_layer={cfg.n_layer})")
        _require(cfg, field, getattr(cfg, needs) is not None, f"needs {needs} to be set")
    _require(cfg, "rope_interleave", not (cfg.rope_interleave and cfg.rope_condense_ratio != 1),
             "cannot be combined with rope_condense_ratio != 1")
