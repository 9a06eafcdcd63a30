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

NORM_CLASSES = ("LayerNorm", "RMSNorm")
MLP_CLASSES = ("GptNeoxMLP", "LLaMAMLP")
GELU_APPROXIMATIONS = ("none", "tanh")


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
    # linear scaling: {factor} alone.
    rope_adjustments: dict[str, float] | None = None
    # Block layout.
    parallel_residual: bool = True
    shared_attention_norm: bool = False
    bias: bool = True
    lm_head_bias: bool = False
    norm_class_name: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    norm_eps: float = 1e-5
    mlp_class_name: Literal["GptNeoxMLP", "LLaMAMLP"] = "GptNeoxMLP"
    intermediate_size: int | None = None
    gelu_approximate: str = "none"
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
        _require(self, "shared_attention_norm", not self.shared_attention_norm or self.parallel_residual,
                 "requires parallel_residual=True (a sequential block has no single input to share a norm of)")
        _require(self, "dropout", 0.0 <= self.dropout < 1.0, "must be in [0, 1)")
        _require(self, "norm_eps", self.norm_eps > 0, "must be positive")

    @property
    def q_per_kv(self) -> int:
        """Query heads that share one key/value head (1 for MHA, n_head for MQA)."""
        return self.n_head // self.n_query_groups

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
    llama3 = {"factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"}
    ok = isinstance(adj, dict) and set(adj) in ({"factor"}, llama3)
    _require(cfg, "rope_adjustments", ok, f"must have the keys {{'factor'}} (linear) or {sorted(llama3)} (Llama 3.1)")
    _require(cfg, "rope_adjustments", adj["factor"] > 0, "needs factor > 0")
    if "low_freq_factor" in adj:
        _require(cfg, "rope_adjustments", adj["high_freq_factor"] > adj["low_freq_factor"],
                 "needs high_freq_factor > low_freq_factor")


# ------------------------------------------------------------------------------------------------
# Presets, under LitGPT's names. Each is the set of fields that differ from the defaults above.
# ------------------------------------------------------------------------------------------------

_PYTHIA = dict(padding_multiple=128)  # GPT-NeoX defaults otherwise: rotary 0.25, parallel residual, bias
_LLAMA = dict(
    rotary_percentage=1.0, parallel_residual=False, bias=False,
    norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP",
)

PRESETS: dict[str, dict[str, Any]] = {
    # EleutherAI Pythia (GPT-NeoX architecture).
    "pythia-14m": dict(_PYTHIA, block_size=512, n_layer=6, n_embd=128, n_head=4),
    "pythia-31m": dict(_PYTHIA, block_size=1024, n_layer=6, n_embd=256, n_head=8),
    "pythia-70m": dict(_PYTHIA, block_size=2048, n_layer=6, n_embd=512, n_head=8),
    "pythia-160m": dict(_PYTHIA, block_size=2048, n_layer=12, n_embd=768, n_head=12),
    "pythia-410m": dict(_PYTHIA, block_size=2048, n_layer=24, n_embd=1024, n_head=16),
    "pythia-1b": dict(_PYTHIA, block_size=2048, n_layer=16, n_embd=2048, n_head=8),
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
    "Llama-3.2-1B": dict(
        _LLAMA, block_size=131072, vocab_size=128000, padded_vocab_size=128256, n_layer=16, n_head=32,
        n_embd=2048, n_query_groups=8, intermediate_size=8192, rope_base=500000, norm_eps=1e-5,
        tie_embeddings=True,
        rope_adjustments=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192),
    ),
    # The seed project's baseline: a nanoGPT-sized model with Pythia's block layout, trained
    # char-level on Tiny Shakespeare (65 symbols; the vocabulary is padded to 128 for the MXU/tensor cores).
    "baseline-tiny": dict(
        block_size=256, vocab_size=65, padding_multiple=64, n_layer=6, n_head=6, n_embd=384,
        rotary_percentage=0.25, parallel_residual=True, bias=True,
        norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP",
    ),
}
for _name, _fields in PRESETS.items():
    _fields["name"] = _name
