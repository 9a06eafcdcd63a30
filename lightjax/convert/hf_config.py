"""Hugging Face `config.json` <-> ModelConfig, for every architecture lightjax imports and exports.

Each HF architecture (`model_type`) is a point in ModelConfig's space: `_ARCHITECTURES` says which
fields it fixes and which it leaves free. Import reads the HF keys into those fields; export checks
that a ModelConfig fits an architecture (naming every field that does not) and writes its keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightjax.model.config import ModelConfig

# Every field that some architecture fixes, at the value the Llama architecture has.
_PLAIN: dict[str, Any] = dict(
    norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", parallel_residual=False, shared_attention_norm=False,
    bias=False, attn_bias=False, lm_head_bias=False, rotary_percentage=1.0, gelu_approximate="none",
    norm_unit_offset=False, norm_1=True, norm_2=True, post_attention_norm=False, post_mlp_norm=False,
    norm_qk=False, norm_qk_type="default", scale_embeddings=False, attention_scores_scalar=None,
    attention_logit_softcapping=None, final_logit_softcapping=None, sliding_window_size=None,
    sliding_window_indices=None, rope_local_base_freq=None, rope_indices=None, rope_interleave=False,
    rope_condense_ratio=1, n_expert=0, n_expert_per_token=0,
)
_GEMMA = dict(mlp_class_name="GemmaMLP", gelu_approximate="tanh", norm_unit_offset=True, scale_embeddings=True)
_GEMMA2 = dict(_GEMMA, post_attention_norm=True, post_mlp_norm=True)
_GEMMA2_FREE = {"attention_scores_scalar", "attention_logit_softcapping", "final_logit_softcapping",
                "sliding_window_size", "sliding_window_indices"}
_SILU = {"gelu_approximate"}  # GELU settings do not matter to a SwiGLU MLP
_MOE = {"n_expert", "n_expert_per_token"}

# model_type -> (the HF class, fields fixed away from _PLAIN, fields left free). In export's order
# of preference: the first that fits a ModelConfig is the one written.
_ARCHITECTURES: dict[str, tuple[str, dict[str, Any], set[str]]] = {
    "llama": ("LlamaForCausalLM", {}, {"bias"} | _SILU),
    "gpt_neox": ("GPTNeoXForCausalLM", dict(norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP", bias=True,
                                            parallel_residual=True),
                 {"parallel_residual", "rotary_percentage", "gelu_approximate"}),
    "mistral": ("MistralForCausalLM", {}, {"sliding_window_size"} | _SILU),
    "qwen2": ("Qwen2ForCausalLM", dict(attn_bias=True), _SILU),
    "qwen3": ("Qwen3ForCausalLM", dict(norm_qk=True), _SILU),
    "mixtral": ("MixtralForCausalLM", dict(mlp_class_name="LLaMAMoE"), {"sliding_window_size"} | _SILU | _MOE),
    "gemma": ("GemmaForCausalLM", _GEMMA, set()),
    "gemma2": ("Gemma2ForCausalLM", _GEMMA2, _GEMMA2_FREE),
    "gemma3_text": ("Gemma3ForCausalLM", dict(_GEMMA2, norm_qk=True),
                    _GEMMA2_FREE | {"rope_local_base_freq", "rope_indices"}),
    "olmo2": ("Olmo2ForCausalLM", dict(norm_1=False, norm_2=False, post_attention_norm=True, post_mlp_norm=True,
                                       norm_qk=True, norm_qk_type="olmo2"), _SILU),
    "phi": ("PhiForCausalLM", dict(norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP", bias=True,
                                   parallel_residual=True, shared_attention_norm=True, lm_head_bias=True),
            {"rotary_percentage", "gelu_approximate"}),
    "falcon": ("FalconForCausalLM", dict(norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP",
                                         parallel_residual=True),
               {"parallel_residual", "shared_attention_norm", "bias"}),
    "phi3": ("Phi3ForCausalLM", {}, {"rotary_percentage", "sliding_window_size"} | _SILU),
}
SUPPORTED_MODEL_TYPES = tuple(_ARCHITECTURES)


# ------------------------------------------------------------------------------------------------
# Import.
# ------------------------------------------------------------------------------------------------


def _rope_params(hf: Mapping[str, Any], layer_type: str = "full_attention") -> dict[str, Any]:
    """transformers >= 5 keeps RoPE settings in `rope_parameters` (per layer type for Gemma 3);
    older configs use loose keys and `rope_scaling`."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if layer_type in rope:
        rope = dict(rope[layer_type])
    for legacy, key in (("rope_theta", "rope_theta"), ("rotary_emb_base", "rope_theta"),
                        ("rotary_pct", "partial_rotary_factor"), ("partial_rotary_factor", "partial_rotary_factor")):
        if legacy in hf and key not in rope:
            rope[key] = hf[legacy]
    return rope


def _rope_adjustments(rope: Mapping[str, Any]) -> dict[str, float] | None:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return {"factor": float(rope["factor"])}
    if kind == "llama3":
        return {
            "factor": float(rope["factor"]),
            "low_freq_factor": float(rope["low_freq_factor"]),
            "high_freq_factor": float(rope["high_freq_factor"]),
            "original_max_seq_len": int(rope["original_max_position_embeddings"]),
        }
    if kind == "yarn":
        adj = {"factor": float(rope["factor"]), "original_max_seq_len": int(rope["original_max_position_embeddings"]),
               "beta_fast": float(rope.get("beta_fast") or 32), "beta_slow": float(rope.get("beta_slow") or 1)}
        adj.update({k: rope[k] for k in ("attention_factor", "mscale", "mscale_all_dim", "truncate")
                    if rope.get(k) is not None})
        return adj
    raise ValueError(f"RoPE scaling type {kind!r} is not supported; supported: 'default', 'linear', 'llama3', 'yarn'.")


def _layer_types(hf: Mapping[str, Any], model_type: str) -> list[str] | None:
    """`layer_types`, or what transformers derives when a config.json has none."""
    if hf.get("layer_types") is not None:
        return list(hf["layer_types"])
    n = hf["num_hidden_layers"]
    if model_type == "gemma2":  # local and global layers alternate
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    if model_type == "gemma3_text":  # five local layers, then a global one
        period = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        return ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n)]
    if model_type in ("qwen2", "qwen3"):  # windows above max_window_layers
        return ["sliding_attention" if i >= hf.get("max_window_layers", n) else "full_attention" for i in range(n)]
    return None


def _layer_flags(types: list[str] | None, kind: str) -> tuple[int, ...] | None:
    """Per-layer 0/1 flags; None when there are no types or when every layer is of `kind`."""
    flags = None if types is None else tuple(int(t == kind) for t in types)
    return None if flags is not None and all(flags) else flags


_ALIASES = (("num_attention_heads", "n_head"), ("num_hidden_layers", "n_layer"))


def config_from_hf(hf_config: Mapping[str, Any]) -> ModelConfig:
    """A ModelConfig from a Hugging Face `config.json` dict."""
    hf = dict(hf_config)
    for key, alias in _ALIASES:  # Falcon's config.json may use its original names
        if key not in hf and alias in hf:
            hf[key] = hf[alias]
    model_type = hf.get("model_type")
    if model_type not in _ARCHITECTURES:
        raise ValueError(f"Hugging Face model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}.")
    _check_types(hf)
    rope = _rope_params(hf)
    n_head = hf["num_attention_heads"]
    fields: dict[str, Any] = dict(
        _PLAIN, **_ARCHITECTURES[model_type][1],
        name=hf.get("_name_or_path") or model_type,
        block_size=hf.get("max_position_embeddings", 4096),
        vocab_size=hf["vocab_size"],
        padded_vocab_size=hf["vocab_size"],  # the checkpoint's embedding is already padded
        n_layer=hf["num_hidden_layers"],
        n_embd=hf["hidden_size"],
        n_head=n_head,
        n_query_groups=hf.get("num_key_value_heads") or n_head,
        head_size=hf.get("head_dim") or hf["hidden_size"] // n_head,
        intermediate_size=hf.get("intermediate_size"),
        rotary_percentage=rope.get("partial_rotary_factor", 1.0),
        rope_base=rope.get("rope_theta", 10000),
        rope_adjustments=_rope_adjustments(rope),
        tie_embeddings=bool(hf.get("tie_word_embeddings", model_type in ("gemma", "gemma2", "gemma3_text", "falcon"))),
        norm_eps=hf.get("rms_norm_eps", hf.get("layer_norm_eps", hf.get("layer_norm_epsilon", 1e-5))),
    )
    window = hf.get("sliding_window")
    sliding = _layer_flags(_layer_types(hf, model_type), "sliding_attention")
    if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window"):
        window = None
    if window and (sliding is None or any(sliding)):
        fields.update(sliding_window_size=window, sliding_window_indices=sliding)
    _FAMILY_READERS.get(model_type, _read_llama)(hf, fields, model_type)
    if fields["rotary_percentage"] * fields["head_size"] % 2:
        raise ValueError(f"partial_rotary_factor {fields['rotary_percentage']} of head_dim {fields['head_size']} "
                         "is not a whole number of channel pairs.")
    return ModelConfig(**fields)


_REQUIRED_INTS = ("vocab_size", "num_hidden_layers", "hidden_size", "num_attention_heads")
_OPTIONAL_INTS = ("max_position_embeddings", "num_key_value_heads", "head_dim", "intermediate_size", "sliding_window",
                  "num_local_experts", "num_experts_per_tok", "num_kv_heads", "ffn_hidden_size")
_OPTIONAL_NUMBERS = ("rope_theta", "rotary_emb_base", "rotary_pct", "partial_rotary_factor", "rms_norm_eps",
                     "layer_norm_eps", "layer_norm_epsilon", "query_pre_attn_scalar", "attn_logit_softcapping",
                     "final_logit_softcapping", "rope_local_base_freq")


def _check_types(hf: Mapping[str, Any]) -> None:
    """A ValueError naming every size the config lacks and every value of the wrong type."""
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    problems = [f"'{k}' is missing (a positive integer)" for k in _REQUIRED_INTS if k not in hf]
    problems += [f"'{k}' is {hf[k]!r}, not a positive integer" for k in _REQUIRED_INTS + _OPTIONAL_INTS
                 if hf.get(k) is not None and not is_int(hf[k])]
    problems += [f"'{k}' is {hf[k]!r}, not a number" for k in _OPTIONAL_NUMBERS
                 if hf.get(k) is not None and (isinstance(hf[k], bool) or not isinstance(hf[k], (int, float)))]
    if problems:
        raise ValueError("; ".join(problems) + ".")


def _activation(hf: Mapping[str, Any], default: str, allowed: dict[str, str], model_type: str) -> str:
    act = hf.get("hidden_act") or hf.get("hidden_activation") or hf.get("activation") or default
    if act not in allowed:
        raise ValueError(f"{model_type} hidden_act {act!r} is not supported; supported: {', '.join(allowed)}.")
    return allowed[act]


_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}


def _read_llama(hf: dict, fields: dict, model_type: str) -> None:
    """Llama and the architectures built on it (Mistral, Mixtral, Qwen, Gemma, OLMo 2, Phi-3)."""
    if model_type.startswith("gemma"):
        fields["gelu_approximate"] = _activation(hf, "gelu_pytorch_tanh", _GELU, model_type)
        fields["attention_scores_scalar"] = hf.get("query_pre_attn_scalar")
        fields["attention_logit_softcapping"] = hf.get("attn_logit_softcapping")
        fields["final_logit_softcapping"] = hf.get("final_logit_softcapping")
    else:
        _activation(hf, "silu", {"silu": "none"}, model_type)
    if model_type == "gemma3_text":
        local = _rope_params(hf, "sliding_attention")
        fields["rope_local_base_freq"] = hf.get("rope_local_base_freq") or local.get("rope_theta", 10000)
        # Local RoPE goes with the sliding-window layers (none when no layer has a window).
        if fields["sliding_window_size"] is not None:
            fields["rope_indices"] = fields["sliding_window_indices"] or (1,) * fields["n_layer"]
    if model_type == "mixtral":
        fields.update(n_expert=hf["num_local_experts"], n_expert_per_token=hf["num_experts_per_tok"],
                      moe_intermediate_size=hf["intermediate_size"])
    attn_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if model_type == "llama" and attn_bias != mlp_bias:
        raise ValueError(f"Llama with attention_bias={attn_bias} and mlp_bias={mlp_bias} is not supported "
                         "(lightjax's `bias` covers both).")
    if model_type == "llama":
        fields["bias"] = attn_bias
    elif model_type != "qwen2" and (attn_bias or mlp_bias):
        raise ValueError(f"{model_type} with attention_bias or mlp_bias is not supported.")


def _read_gpt_neox(hf: dict, fields: dict, model_type: str) -> None:
    if not hf.get("attention_bias", True):
        raise ValueError("GPT-NeoX with attention_bias=False is not supported (its MLP keeps biases).")
    fields.update(gelu_approximate=_activation(hf, "gelu", _GELU, model_type), n_query_groups=fields["n_head"],
                  rotary_percentage=_rope_params(hf).get("partial_rotary_factor", 0.25),
                  parallel_residual=hf.get("use_parallel_residual", True))


def _read_phi(hf: dict, fields: dict, model_type: str) -> None:
    if hf.get("qk_layernorm"):
        raise ValueError("phi with qk_layernorm=True is not supported.")
    fields["gelu_approximate"] = _activation(hf, "gelu_new", _GELU, model_type)
    fields["rotary_percentage"] = _rope_params(hf).get("partial_rotary_factor", 0.5)


def _read_falcon(hf: dict, fields: dict, model_type: str) -> None:
    if hf.get("alibi"):
        raise ValueError("falcon with alibi=True is not supported (lightjax uses rotary embeddings).")
    if hf.get("apply_residual_connection_post_layernorm"):
        raise ValueError("falcon with apply_residual_connection_post_layernorm=True is not supported.")
    _activation(hf, "gelu", {"gelu": "none"}, model_type)
    n_head, parallel = fields["n_head"], hf.get("parallel_attn", True)
    new = hf.get("new_decoder_architecture", False)
    groups = hf.get("num_kv_heads") or n_head if new else (1 if hf.get("multi_query", True) else n_head)
    fields.update(n_query_groups=groups, bias=bool(hf.get("bias", False)), parallel_residual=parallel or new,
                  shared_attention_norm=parallel and not (new and hf.get("num_ln_in_parallel_attn") in (None, 2)),
                  intermediate_size=hf.get("ffn_hidden_size") or 4 * fields["n_embd"])


_FAMILY_READERS = {"gpt_neox": _read_gpt_neox, "phi": _read_phi, "falcon": _read_falcon}


# ------------------------------------------------------------------------------------------------
# Export.
# ------------------------------------------------------------------------------------------------


def _misfits(cfg: ModelConfig, model_type: str) -> list[str]:
    """The fields of `cfg` that the architecture cannot hold, each with what it would need."""
    _, fixed, free = _ARCHITECTURES[model_type]
    want = dict(_PLAIN, **fixed)
    out = []
    for field, value in want.items():
        have = getattr(cfg, field)
        if field == "attention_scores_scalar" and have == cfg.head_size:
            have = None  # the same as the default scale
        if field not in free and have != value:
            out.append(f"{field}={have!r} (needs {value!r})")
    if model_type == "gpt_neox" and cfg.n_query_groups != cfg.n_head:
        out.append(f"n_query_groups={cfg.n_query_groups} (needs n_head={cfg.n_head}: no grouped queries)")
    if model_type in ("gpt_neox", "phi", "falcon") and cfg.n_head * cfg.head_size != cfg.n_embd:
        out.append(f"head_size={cfg.head_size} (needs n_embd / n_head = {cfg.n_embd / cfg.n_head:g})")
    two_norms = cfg.parallel_residual and not cfg.shared_attention_norm  # Falcon's new decoder architecture
    if model_type == "falcon" and not two_norms and cfg.n_query_groups not in (1, cfg.n_head):
        out.append(f"n_query_groups={cfg.n_query_groups} (one norm per block needs 1 or n_head)")
    if model_type in ("mistral", "mixtral", "phi3") and cfg.sliding_window_indices is not None:
        out.append(f"sliding_window_indices={cfg.sliding_window_indices!r} (the window applies to every layer)")
    if model_type == "gemma3_text" and cfg.rope_indices != _sliding_flags(cfg):
        out.append(f"rope_indices={cfg.rope_indices!r} (local RoPE exactly on the sliding-window layers)")
    return out


def _sliding_flags(cfg: ModelConfig) -> tuple[int, ...] | None:
    if cfg.sliding_window_size is None:
        return None
    return cfg.sliding_window_indices or (1,) * cfg.n_layer


def hf_model_type(cfg: ModelConfig, model_type: str | None = None) -> str:
    """The HF architecture that holds `cfg`: `model_type` if given (checked), else the first that fits."""
    if model_type is not None:
        if model_type not in _ARCHITECTURES:
            raise ValueError(f"Hugging Face model_type {model_type!r} is not supported; supported: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}.")
        misfits = _misfits(cfg, model_type)
        if misfits:
            raise ValueError(f"ModelConfig {cfg.name!r} does not fit HF model_type {model_type!r}: "
                             f"{'; '.join(misfits)}.")
        return model_type
    for candidate in _ARCHITECTURES:
        if not _misfits(cfg, candidate):
            return candidate
    closest = min(_ARCHITECTURES, key=lambda t: len(_misfits(cfg, t)))
    raise ValueError(f"ModelConfig {cfg.name!r} fits no supported HF architecture "
                     f"({', '.join(SUPPORTED_MODEL_TYPES)}); "
                     f"the closest, {closest!r}, would need: {'; '.join(_misfits(cfg, closest))}.")


def _rope_scaling(adj: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not adj:
        return None
    if "beta_fast" in adj:
        extra = {k: adj[k] for k in ("attention_factor", "mscale", "mscale_all_dim", "truncate") if k in adj}
        return dict(rope_type="yarn", factor=adj["factor"], beta_fast=adj["beta_fast"], beta_slow=adj["beta_slow"],
                    original_max_position_embeddings=adj["original_max_seq_len"], **extra)
    if "original_max_seq_len" in adj:
        return dict(rope_type="llama3", factor=adj["factor"], low_freq_factor=adj["low_freq_factor"],
                    high_freq_factor=adj["high_freq_factor"],
                    original_max_position_embeddings=adj["original_max_seq_len"])
    return dict(rope_type="linear", factor=adj["factor"])


def config_to_hf(cfg: ModelConfig, model_type: str | None = None) -> dict[str, Any]:
    """A Hugging Face `config.json` dict describing the same architecture as `cfg`."""
    model_type = hf_model_type(cfg, model_type)
    hf: dict[str, Any] = dict(
        model_type=model_type, architectures=[_ARCHITECTURES[model_type][0]],
        vocab_size=cfg.padded_vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_query_groups, head_dim=cfg.head_size,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.block_size,
        tie_word_embeddings=cfg.tie_embeddings, rope_theta=cfg.rope_base,
        rope_scaling=_rope_scaling(cfg.rope_adjustments),
        partial_rotary_factor=cfg.rotary_percentage, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
        attention_bias=cfg.bias or cfg.attn_bias, mlp_bias=cfg.bias, sliding_window=cfg.sliding_window_size,
        pad_token_id=None, bos_token_id=None, eos_token_id=None,
    )
    if model_type in ("gemma2", "gemma3_text"):  # the others window every layer or none
        flags = _sliding_flags(cfg) or (0,) * cfg.n_layer
        hf["layer_types"] = ["sliding_attention" if f else "full_attention" for f in flags]
    if model_type.startswith("gemma"):  # Gemma 1 has no query_pre_attn_scalar; 2 and 3 need one
        if model_type != "gemma":
            hf["query_pre_attn_scalar"] = cfg.attention_scores_scalar or cfg.head_size
        hf.update(hidden_activation="gelu_pytorch_tanh" if cfg.gelu_approximate == "tanh" else "gelu",
                  attn_logit_softcapping=cfg.attention_logit_softcapping,
                  final_logit_softcapping=cfg.final_logit_softcapping)
        hf["hidden_act"] = hf["hidden_activation"]
    if model_type == "gemma3_text":
        hf["rope_local_base_freq"] = cfg.rope_local_base_freq or cfg.rope_base
    if model_type == "mixtral":
        hf.update(num_local_experts=cfg.n_expert, num_experts_per_tok=cfg.n_expert_per_token,
                  intermediate_size=cfg.moe_intermediate_size)
    if model_type in ("gpt_neox", "phi", "falcon"):
        tanh = "gelu_new" if model_type == "phi" else "gelu_pytorch_tanh"
        gelu = "gelu" if cfg.gelu_approximate == "none" else tanh
        hf.update(hidden_act=gelu, layer_norm_eps=cfg.norm_eps, layer_norm_epsilon=cfg.norm_eps,
                  rotary_pct=cfg.rotary_percentage, use_parallel_residual=cfg.parallel_residual,
                  attention_bias=True)
    if model_type == "falcon":
        new = cfg.parallel_residual and not cfg.shared_attention_norm
        del hf["head_dim"]  # derived (hidden_size // num_attention_heads) in FalconConfig
        hf.update(activation="gelu", bias=cfg.bias, parallel_attn=cfg.parallel_residual, alibi=False,
                  new_decoder_architecture=new, multi_query=cfg.n_query_groups == 1, num_kv_heads=cfg.n_query_groups,
                  num_ln_in_parallel_attn=2 if new else None, ffn_hidden_size=cfg.intermediate_size)
    return hf
