"""The model's architecture: `ModelConfig`, its derived fields and its checks.

`ModelConfig` mirrors the field names of LitGPT's `Config`, grouped in sections, so that a LitGPT
user can read a preset (presets.py) here and recognise it. It holds the architecture only: training,
data and mesh settings are the run config's (train/config.py).

`__post_init__` first derives the optional fields (`head_size`, `padded_vocab_size`,
`n_query_groups`, `intermediate_size`, `rope_n_elem`) from the others, then validates the whole:
every invalid combination is one `ValueError` naming the field, so a model is never built from a
config that cannot work.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Literal, get_args

from lightjax.model.presets import PRESETS

NormClass = Literal["LayerNorm", "RMSNorm"]
MLPClass = Literal["GptNeoxMLP", "LLaMAMLP", "GemmaMLP", "LLaMAMoE"]
GeluApproximation = Literal["none", "tanh"]
NormQKType = Literal["default", "olmo2"]
MoEDispatch = Literal["grouped", "dense"]
LoRATarget = Literal["query", "key", "value", "proj", "mlp", "head"]
# rope_adjustments key sets: linear position interpolation, Llama 3.1, YaRN (required keys; YaRN's
# optional ones follow Hugging Face's rope_parameters).
_ROPE_LINEAR = {"factor"}
_ROPE_LLAMA3 = {"factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"}
_ROPE_YARN = {"factor", "original_max_seq_len", "beta_fast", "beta_slow"}
_ROPE_YARN_OPTIONAL = {"attention_factor", "mscale", "mscale_all_dim", "truncate"}
_DERIVABLE = ("head_size", "padded_vocab_size", "n_query_groups", "intermediate_size")


def find_multiple(n: int, k: int) -> int:
    """The smallest multiple of k that is >= n."""
    return n if n % k == 0 else n + k - (n % k)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = ""

    # --- Sizes -----------------------------------------------------------------------------------
    block_size: int = 4096  # the longest sequence the model takes
    vocab_size: int = 50254
    padding_multiple: int = 512  # the embedding and head are padded to a multiple of this (faster matmuls)
    padded_vocab_size: int | None = None  # default: vocab_size rounded up to padding_multiple
    n_layer: int = 16
    n_embd: int = 4096  # width of the residual stream

    # --- Attention heads -------------------------------------------------------------------------
    # Each key/value head serves q_per_kv = n_head // n_query_groups query heads:
    #
    #     multi-head (n_query_groups = n_head)   grouped-query (n_query_groups = 2)   multi-query (1)
    #     q  q  q  q                              q  q  q  q                           q  q  q  q
    #     |  |  |  |                              \  /  \  /                            \ \  / /
    #     kv kv kv kv                              kv    kv                                kv
    n_head: int = 32
    head_size: int | None = None  # default: n_embd // n_head
    n_query_groups: int | None = None  # default: n_head

    # --- Rotary position embedding ---------------------------------------------------------------
    # The first `rope_n_elem = rotary_percentage * head_size` channels of each head rotate.
    rotary_percentage: float = 0.25
    rope_base: int | float = 10000
    rope_condense_ratio: int = 1  # positions are divided by this (linear scaling, LitGPT's name)
    # Llama 3.1 style: {factor, low_freq_factor, high_freq_factor, original_max_seq_len};
    # linear scaling: {factor} alone; YaRN: {factor, original_max_seq_len, beta_fast, beta_slow}.
    rope_adjustments: dict[str, float] | None = None
    # Rotate channel pairs (0, 1), (2, 3), ... instead of halves (0, n/2), (1, n/2 + 1), ...
    rope_interleave: bool = False
    # Gemma 3: layers with rope_indices[i] == 1 use base rope_local_base_freq, unscaled.
    rope_local_base_freq: float | None = None
    rope_indices: tuple[int, ...] | None = None

    # --- Block layout and norms ------------------------------------------------------------------
    parallel_residual: bool = True  # x + attn(norm_1(x)) + mlp(norm_2(x)); False: one after the other
    shared_attention_norm: bool = False  # parallel blocks: the MLP reads norm_1's output (Phi, Falcon)
    bias: bool = True  # every linear layer but lm_head
    attn_bias: bool = False  # the qkv projection only (Qwen2)
    lm_head_bias: bool = False
    norm_class_name: NormClass = "LayerNorm"
    norm_eps: float = 1e-5
    norm_unit_offset: bool = False  # Gemma: RMSNorm scales by (1 + weight), the weight starting at 0
    norm_1: bool = True  # the norm before attention (OLMo 2 has none)
    norm_2: bool = True  # the norm before the MLP
    post_attention_norm: bool = False  # a norm of the attention output before the residual (Gemma 2/3, OLMo 2)
    post_mlp_norm: bool = False  # the same for the MLP output
    norm_qk: bool = False  # RMSNorm of queries and keys: per head ("default") or per projection ("olmo2")
    norm_qk_type: NormQKType = "default"

    # --- MLP -------------------------------------------------------------------------------------
    mlp_class_name: MLPClass = "GptNeoxMLP"  # a module of lightjax/model/mlp.py
    intermediate_size: int | None = None  # default (GptNeoxMLP only): 4 * n_embd
    gelu_approximate: GeluApproximation = "none"
    # Mixture of experts (LLaMAMoE): each token goes through n_expert_per_token of n_expert SwiGLU MLPs.
    n_expert: int = 0
    n_expert_per_token: int = 0
    moe_intermediate_size: int | None = None  # default: intermediate_size
    # How tokens reach their experts: "grouped" runs each expert over the tokens that picked it;
    # "dense" runs every expert over every token (expert-parallel over a mesh; see mlp.LLaMAMoE).
    moe_dispatch: MoEDispatch = "grouped"

    # --- Attention variants ----------------------------------------------------------------------
    # Scores scale 1/sqrt(attention_scores_scalar or head_size); tanh soft-capping of the scores and
    # of the final logits (Gemma 2); a causal window of sliding_window_size keys (itself included) on
    # the layers with sliding_window_indices[i] == 1 (all layers when None).
    attention_scores_scalar: int | None = None
    attention_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window_size: int | None = None
    sliding_window_indices: tuple[int, ...] | None = None

    # --- Embeddings and regularisation -----------------------------------------------------------
    scale_embeddings: bool = False  # multiply the embeddings by sqrt(n_embd) (Gemma)
    tie_embeddings: bool = False  # lm_head reuses the embedding matrix
    dropout: float = 0.0  # on the embeddings and on each branch's output

    # --- LoRA adapters (lora.py; set from the run's config.lora) -------------------------------------
    # Rank r of the adapters (0: none); each adapted layer adds alpha / r * dropout(x) A B to x W.
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("query", "value")  # LitGPT's defaults; any of LoRATarget

    # --- Derived in __post_init__ ----------------------------------------------------------------
    rope_n_elem: int = dataclasses.field(init=False, default=0)
    # The optional fields that __post_init__ filled in, so that `replace` derives them again.
    _derived: frozenset = dataclasses.field(init=False, default=frozenset(), repr=False, compare=False)

    def __post_init__(self) -> None:
        self._derive()
        _validate(self)

    def _derive(self) -> None:
        """Fill in the optional fields from the others, where they can be (what cannot is left for
        `_validate` to report)."""
        def set_(field: str, value: Any) -> None:
            object.__setattr__(self, field, value)  # a frozen dataclass

        set_("_derived", frozenset(k for k in _DERIVABLE if getattr(self, k) is None))
        for field in ("sliding_window_indices", "rope_indices", "lora_targets"):  # lists from a JSON or command line
            if isinstance(getattr(self, field), list):
                set_(field, tuple(getattr(self, field)))
        if self.head_size is None and self.n_head > 0 and self.n_embd % self.n_head == 0:
            set_("head_size", self.n_embd // self.n_head)
        if self.padded_vocab_size is None:
            if self.padding_multiple > 0:
                set_("padded_vocab_size", find_multiple(self.vocab_size, self.padding_multiple))
        else:
            # As in LitGPT: a preset may pin the padded size; the usable vocabulary cannot exceed it.
            set_("vocab_size", min(self.vocab_size, self.padded_vocab_size))
        if self.n_query_groups is None:
            set_("n_query_groups", self.n_head)
        if self.intermediate_size is None and self.mlp_class_name == "GptNeoxMLP":
            set_("intermediate_size", 4 * self.n_embd)
        if self.mlp_class_name == "LLaMAMoE" and self.moe_intermediate_size is None:
            set_("moe_intermediate_size", self.intermediate_size)
        if self.head_size is not None:
            set_("rope_n_elem", int(self.rotary_percentage * self.head_size))

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


def _require_choice(cfg: ModelConfig, field: str, choices: Any) -> None:
    choices = get_args(choices)
    _require(cfg, field, getattr(cfg, field) in choices, f"is not one of {', '.join(map(repr, choices))}")


def _validate(cfg: ModelConfig) -> None:
    """Reject every combination that cannot work, naming the field."""
    _validate_shapes(cfg)
    _validate_rope(cfg)
    _validate_block(cfg)
    _validate_mlp(cfg)
    _validate_attention_variants(cfg)
    _validate_lora(cfg)


def _validate_shapes(cfg: ModelConfig) -> None:
    for field in ("block_size", "vocab_size", "padding_multiple", "n_layer", "n_embd", "n_head"):
        _require(cfg, field, getattr(cfg, field) > 0, "must be a positive integer")
    _require(cfg, "n_embd", cfg.head_size is not None,
             f"must be divisible by n_head={cfg.n_head} (or set head_size explicitly)")
    _require(cfg, "head_size", cfg.head_size > 0, "must be a positive integer")
    _require(cfg, "n_query_groups", 0 < cfg.n_query_groups <= cfg.n_head, "must be in [1, n_head]")
    _require(cfg, "n_head", cfg.n_head % cfg.n_query_groups == 0,
             f"must be divisible by n_query_groups={cfg.n_query_groups}")


def _validate_rope(cfg: ModelConfig) -> None:
    _require(cfg, "rotary_percentage", 0.0 <= cfg.rotary_percentage <= 1.0, "must be in [0, 1]")
    _require(cfg, "rotary_percentage", cfg.rope_n_elem % 2 == 0,
             f"gives rope_n_elem={cfg.rope_n_elem} for head_size={cfg.head_size}; it must be even")
    _require(cfg, "rope_interleave", not (cfg.rope_interleave and cfg.rope_condense_ratio != 1),
             "cannot be combined with rope_condense_ratio != 1")
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


def _validate_block(cfg: ModelConfig) -> None:
    _require_choice(cfg, "norm_class_name", NormClass)
    _require_choice(cfg, "norm_qk_type", NormQKType)
    _require(cfg, "norm_unit_offset", not cfg.norm_unit_offset or cfg.norm_class_name == "RMSNorm",
             "needs norm_class_name='RMSNorm'")
    _require(cfg, "shared_attention_norm", not cfg.shared_attention_norm or cfg.parallel_residual,
             "requires parallel_residual=True (a sequential block has no single input to share a norm of)")
    _require(cfg, "dropout", 0.0 <= cfg.dropout < 1.0, "must be in [0, 1)")
    _require(cfg, "norm_eps", cfg.norm_eps > 0, "must be positive")


def _validate_mlp(cfg: ModelConfig) -> None:
    _require_choice(cfg, "mlp_class_name", MLPClass)
    _require_choice(cfg, "gelu_approximate", GeluApproximation)
    _require(cfg, "intermediate_size", cfg.intermediate_size is not None,
             f"must be set for mlp_class_name={cfg.mlp_class_name!r}")
    _require(cfg, "intermediate_size", cfg.intermediate_size > 0, "must be a positive integer")
    if cfg.mlp_class_name == "LLaMAMoE":
        _require(cfg, "n_expert", cfg.n_expert > 1, "must be > 1 for mlp_class_name='LLaMAMoE'")
        _require(cfg, "n_expert_per_token", 0 < cfg.n_expert_per_token <= cfg.n_expert,
                 f"must be in [1, n_expert={cfg.n_expert}]")
        _require(cfg, "moe_intermediate_size", cfg.moe_intermediate_size > 0, "must be a positive integer")
        _require_choice(cfg, "moe_dispatch", MoEDispatch)
    else:
        _require(cfg, "n_expert", cfg.n_expert == 0, f"needs mlp_class_name='LLaMAMoE' (is {cfg.mlp_class_name!r})")


def _validate_attention_variants(cfg: ModelConfig) -> None:
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


def _validate_lora(cfg: ModelConfig) -> None:
    _require(cfg, "lora_r", cfg.lora_r >= 0, "must be >= 0 (0: no adapters)")
    if cfg.lora_r == 0:
        return
    choices = get_args(LoRATarget)
    _require(cfg, "lora_targets", bool(cfg.lora_targets) and set(cfg.lora_targets) <= set(choices),
             f"must name one or more of {', '.join(map(repr, choices))}")
    _require(cfg, "lora_alpha", cfg.lora_alpha > 0, "must be positive")
    _require(cfg, "lora_dropout", 0.0 <= cfg.lora_dropout < 1.0, "must be in [0, 1)")
    _require(cfg, "lora_targets", not ("head" in cfg.lora_targets and cfg.tie_embeddings),
             "cannot include 'head' when the head is tied to the embeddings (tie_embeddings=True)")
    _require(cfg, "lora_targets", not ("mlp" in cfg.lora_targets and cfg.mlp_class_name == "LLaMAMoE"),
             "cannot include 'mlp' for a mixture of experts (LLaMAMoE): adapters cover dense layers only")
