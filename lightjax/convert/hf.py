"""Hugging Face `transformers` checkpoints <-> lightjax, for the GPT-NeoX and Llama families.

Weights are handled as numpy arrays: no torch is needed to import a checkpoint. A conversion is a table of
entries "these HF tensors -> this lightjax parameter, through this reshaping", so that the expected
names are known before any tensor is touched and every missing or unknown name is reported at once.

Layouts: a torch Linear weight is [out, in]; a lightjax kernel is [in..., out...]. The lightjax qkv
kernel is [n_embd, n_query_groups, q_per_kv + 2, head_size] (see `CausalSelfAttention`); GPT-NeoX
stores its fused qkv rows as [n_head, 3, head_size], which is that layout with one query per group;
Llama stores q, k and v separately.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from lightjax.config import ModelConfig
from lightjax.convert.safetensors_io import read_safetensors
from lightjax.model import abstract_params

SUPPORTED_MODEL_TYPES = ("gpt_neox", "llama")

# Buffers that older checkpoints saved next to the weights; they are recomputed, never loaded.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|attention\.bias|attention\.masked_bias)$")


# ------------------------------------------------------------------------------------------------
# Configs.
# ------------------------------------------------------------------------------------------------


def _rope_params(hf: Mapping[str, Any]) -> dict[str, Any]:
    """transformers >= 5 keeps RoPE settings in `rope_parameters`; older configs use loose keys."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
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
    raise ValueError(f"RoPE scaling type {kind!r} is not supported; supported: 'default', 'linear', 'llama3'.")


def config_from_hf(hf_config: Mapping[str, Any]) -> ModelConfig:
    """A ModelConfig from a Hugging Face `config.json` dict (GPT-NeoX or Llama)."""
    hf = dict(hf_config)
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"Hugging Face model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}.")
    rope = _rope_params(hf)
    common = dict(
        name=hf.get("_name_or_path") or model_type,
        block_size=hf.get("max_position_embeddings", 4096),
        vocab_size=hf["vocab_size"],
        padded_vocab_size=hf["vocab_size"],  # the checkpoint's embedding is already padded
        n_layer=hf["num_hidden_layers"],
        n_embd=hf["hidden_size"],
        n_head=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        rope_base=rope.get("rope_theta", 10000),
        rope_adjustments=_rope_adjustments(rope),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    if model_type == "gpt_neox":
        if not hf.get("attention_bias", True):
            raise ValueError("GPT-NeoX with attention_bias=False is not supported (its MLP keeps biases).")
        act = hf.get("hidden_act", "gelu")
        approx = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}
        if act not in approx:
            raise ValueError(f"GPT-NeoX hidden_act {act!r} is not supported; supported: {', '.join(approx)}.")
        return ModelConfig(
            **common, rotary_percentage=rope.get("partial_rotary_factor", 0.25),
            parallel_residual=hf.get("use_parallel_residual", True), bias=True,
            norm_class_name="LayerNorm", norm_eps=hf.get("layer_norm_eps", 1e-5),
            mlp_class_name="GptNeoxMLP", gelu_approximate=approx[act],
        )
    # Llama
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Llama hidden_act {hf['hidden_act']!r} is not supported; supported: 'silu'.")
    attn_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    if attn_bias != mlp_bias:
        raise ValueError(f"Llama with attention_bias={attn_bias} and mlp_bias={mlp_bias} is not supported "
                         "(lightjax's `bias` covers both).")
    return ModelConfig(
        **common, n_query_groups=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_size=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        rotary_percentage=rope.get("partial_rotary_factor", 1.0), parallel_residual=False, bias=attn_bias,
        norm_class_name="RMSNorm", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp_class_name="LLaMAMLP",
    )


def hf_model_type(cfg: ModelConfig) -> str:
    """Which HF architecture can hold `cfg`, or a ValueError saying why none can."""
    if cfg.mlp_class_name == "LLaMAMLP" and cfg.norm_class_name == "RMSNorm" and not cfg.parallel_residual:
        return "llama"
    if (cfg.mlp_class_name == "GptNeoxMLP" and cfg.norm_class_name == "LayerNorm" and cfg.bias
            and cfg.n_query_groups == cfg.n_head and not cfg.shared_attention_norm and not cfg.lm_head_bias):
        return "gpt_neox"
    raise ValueError(f"ModelConfig {cfg.name!r} matches neither GPT-NeoX (LayerNorm, GptNeoxMLP, bias, MHA) "
                     "nor Llama (RMSNorm, LLaMAMLP, sequential residual).")


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A Hugging Face `config.json` dict describing the same architecture as `cfg`."""
    model_type = hf_model_type(cfg)
    rope_scaling = None
    if cfg.rope_adjustments and "original_max_seq_len" in cfg.rope_adjustments:
        a = cfg.rope_adjustments
        rope_scaling = dict(rope_type="llama3", factor=a["factor"], low_freq_factor=a["low_freq_factor"],
                            high_freq_factor=a["high_freq_factor"],
                            original_max_position_embeddings=a["original_max_seq_len"])
    elif cfg.rope_adjustments:
        rope_scaling = dict(rope_type="linear", factor=cfg.rope_adjustments["factor"])
    if cfg.rope_condense_ratio != 1:
        raise ValueError("rope_condense_ratio != 1 has no Hugging Face equivalent.")
    hf: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=cfg.padded_vocab_size,
        hidden_size=cfg.n_embd,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.block_size,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_theta=cfg.rope_base,
        rope_scaling=rope_scaling,
    )
    if model_type == "gpt_neox":
        hf.update(architectures=["GPTNeoXForCausalLM"], rotary_pct=cfg.rotary_percentage,
                  use_parallel_residual=cfg.parallel_residual, layer_norm_eps=cfg.norm_eps, attention_bias=True,
                  hidden_act="gelu" if cfg.gelu_approximate == "none" else "gelu_pytorch_tanh")
    else:
        if cfg.rotary_percentage != 1.0:
            raise ValueError("Llama checkpoints rotate whole heads; rotary_percentage must be 1.0.")
        hf.update(architectures=["LlamaForCausalLM"], num_key_value_heads=cfg.n_query_groups,
                  head_dim=cfg.head_size, rms_norm_eps=cfg.norm_eps, attention_bias=cfg.bias,
                  mlp_bias=cfg.bias, hidden_act="silu")
    return hf


# ------------------------------------------------------------------------------------------------
# Weights.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Entry:
    """HF tensors `sources` -> lightjax parameter at `target` (a '/'-joined path) via `fn`."""

    sources: tuple[str, ...]
    target: str
    fn: Callable[..., np.ndarray]


def _linear(*shape: int) -> Callable[[np.ndarray], np.ndarray]:
    """torch Linear weight [out, in] -> kernel [in..., out...] of the given shape."""
    return lambda w: np.asarray(w).T.reshape(shape)


def _reshape(*shape: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda b: np.asarray(b).reshape(shape)


def _same(x: np.ndarray) -> np.ndarray:
    return np.asarray(x)


def _fuse_qkv(cfg: ModelConfig, out_first: bool) -> Callable[..., np.ndarray]:
    """Separate q, k, v (weights [out, in] or biases [out]) -> one grouped qkv parameter."""
    g, qpk, hs = cfg.n_query_groups, cfg.q_per_kv, cfg.head_size

    def fuse(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        if out_first:  # weights: move the input axis first
            q, k, v = (np.asarray(x).T for x in (q, k, v))
        lead = q.shape[:-1]
        parts = [q.reshape(*lead, g, qpk, hs), k.reshape(*lead, g, 1, hs), v.reshape(*lead, g, 1, hs)]
        return np.concatenate(parts, axis=-2)

    return fuse


def _norm(cfg: ModelConfig, hf_prefix: str, target: str) -> list[_Entry]:
    entries = [_Entry((f"{hf_prefix}.weight",), f"{target}/scale", _same)]
    if cfg.norm_class_name == "LayerNorm":
        entries.append(_Entry((f"{hf_prefix}.bias",), f"{target}/bias", _same))
    return entries


def _dense(hf_prefix: str, target: str, kernel_shape: tuple[int, ...], bias: bool) -> list[_Entry]:
    entries = [_Entry((f"{hf_prefix}.weight",), f"{target}/kernel", _linear(*kernel_shape))]
    if bias:
        entries.append(_Entry((f"{hf_prefix}.bias",), f"{target}/bias", _same))
    return entries


def _gpt_neox_entries(cfg: ModelConfig) -> list[_Entry]:
    d, n, hs, m = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.intermediate_size
    entries = [_Entry(("gpt_neox.embed_in.weight",), "wte/embedding", _same)]
    for i in range(cfg.n_layer):
        p, t = f"gpt_neox.layers.{i}", f"h_{i}"
        entries += _norm(cfg, f"{p}.input_layernorm", f"{t}/norm_1")
        entries += _norm(cfg, f"{p}.post_attention_layernorm", f"{t}/norm_2")
        entries += [
            _Entry((f"{p}.attention.query_key_value.weight",), f"{t}/attn/qkv/kernel", _linear(d, n, 3, hs)),
            _Entry((f"{p}.attention.query_key_value.bias",), f"{t}/attn/qkv/bias", _reshape(n, 3, hs)),
        ]
        entries += _dense(f"{p}.attention.dense", f"{t}/attn/proj", (n, hs, d), True)
        entries += _dense(f"{p}.mlp.dense_h_to_4h", f"{t}/mlp/fc", (d, m), True)
        entries += _dense(f"{p}.mlp.dense_4h_to_h", f"{t}/mlp/proj", (m, d), True)
    entries += _norm(cfg, "gpt_neox.final_layer_norm", "ln_f")
    if not cfg.tie_embeddings:
        entries += _dense("embed_out", "lm_head", (d, cfg.padded_vocab_size), False)
    return entries


def _llama_entries(cfg: ModelConfig) -> list[_Entry]:
    d, n, hs, m = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.intermediate_size
    entries = [_Entry(("model.embed_tokens.weight",), "wte/embedding", _same)]
    for i in range(cfg.n_layer):
        p, t = f"model.layers.{i}", f"h_{i}"
        qkv = tuple(f"{p}.self_attn.{x}_proj" for x in "qkv")
        entries += _norm(cfg, f"{p}.input_layernorm", f"{t}/norm_1")
        entries += _norm(cfg, f"{p}.post_attention_layernorm", f"{t}/norm_2")
        entries.append(_Entry(tuple(f"{x}.weight" for x in qkv), f"{t}/attn/qkv/kernel", _fuse_qkv(cfg, True)))
        if cfg.bias:
            entries.append(_Entry(tuple(f"{x}.bias" for x in qkv), f"{t}/attn/qkv/bias", _fuse_qkv(cfg, False)))
        entries += _dense(f"{p}.self_attn.o_proj", f"{t}/attn/proj", (n, hs, d), cfg.bias)
        entries += _dense(f"{p}.mlp.gate_proj", f"{t}/mlp/fc_1", (d, m), cfg.bias)
        entries += _dense(f"{p}.mlp.up_proj", f"{t}/mlp/fc_2", (d, m), cfg.bias)
        entries += _dense(f"{p}.mlp.down_proj", f"{t}/mlp/proj", (m, d), cfg.bias)
    entries += _norm(cfg, "model.norm", "ln_f")
    if not cfg.tie_embeddings:
        entries += _dense("lm_head", "lm_head", (d, cfg.padded_vocab_size), False)
    return entries


_ENTRIES = {"gpt_neox": _gpt_neox_entries, "llama": _llama_entries}
_TIED_HEADS = {"gpt_neox": "embed_out.weight", "llama": "lm_head.weight"}
# transformers >= 5 renames GPT-NeoX's `embed_out` to `lm_head` in memory; Hub files keep `embed_out`.
_RENAMES = {"gpt_neox": (re.compile(r"^lm_head\."), "embed_out.")}


def params_from_hf(state_dict: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
    """lightjax parameters (loop layout, numpy, the checkpoint's dtype) from an HF state dict.

    Raises ValueError listing every missing and every unexpected tensor name, or every parameter
    whose shape does not match `cfg`.
    """
    model_type = hf_model_type(cfg)
    if model_type in _RENAMES:
        pattern, repl = _RENAMES[model_type]
        state_dict = {pattern.sub(repl, k): v for k, v in state_dict.items()}
    entries = _ENTRIES[model_type](cfg)
    expected = {name for e in entries for name in e.sources}
    given = {k for k in state_dict if not _IGNORED.search(k)}
    if cfg.tie_embeddings:  # torch's state_dict() repeats the tied head; safetensors files omit it
        given.discard(_TIED_HEADS[model_type])
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise ValueError(f"Cannot convert the {model_type} checkpoint into {cfg.name!r}: "
                         f"missing tensors {missing or 'none'}; unexpected tensors {unexpected or 'none'}.")

    params: dict[str, Any] = {}
    bad = []
    for e in entries:
        node = params
        *parents, leaf = e.target.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        tensors = [state_dict[name] for name in e.sources]
        try:
            node[leaf] = e.fn(*tensors)
        except ValueError:  # a reshape that cannot work: the checkpoint and the config disagree
            bad.append(f"{e.target}: checkpoint {[tuple(t.shape) for t in tensors]} does not fit the config")
    bad += _shape_mismatches(params, cfg)
    if bad:
        raise ValueError(f"Checkpoint shapes do not match ModelConfig {cfg.name!r}: " + "; ".join(bad))
    return params


def _shape_mismatches(params: dict[str, Any], cfg: ModelConfig) -> list[str]:
    want = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params(cfg)))[0]
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    return [f"{jax.tree_util.keystr(path)}: checkpoint {got[path].shape} vs config {tuple(x.shape)}"
            for path, x in want if path in got and got[path].shape != tuple(x.shape)]


def load_hf_checkpoint(directory: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, params) from a Hugging Face model directory: config.json plus safetensors weights
    (a single file or shards listed in model.safetensors.index.json)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"No config.json in {directory}: not a Hugging Face model directory.")
    cfg = config_from_hf(json.loads(config_path.read_text()))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No *.safetensors files in {directory} (PyTorch .bin checkpoints are not read; "
                                "re-save them with `save_pretrained(..., safe_serialization=True)`).")
    state_dict: dict[str, np.ndarray] = {}
    for f in files:
        state_dict.update(read_safetensors(f))
    return cfg, params_from_hf(state_dict, cfg)
