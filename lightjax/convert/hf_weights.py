"""Hugging Face tensors <-> lightjax parameters, for every architecture in hf_config.py.

A conversion is a table of entries "these HF tensors <-> these lightjax parameters, through this
rearrangement and its inverse", so that the expected names are known before any tensor is touched,
every missing or unknown name is reported at once, and export is import run backwards.

Layouts: a torch Linear weight is [out, in]; a lightjax kernel is [in..., out...]. The lightjax qkv
kernel is [n_embd, n_query_groups, q_per_kv + 2, head_size] (see `CausalSelfAttention`): GPT-NeoX and
Falcon store their fused qkv rows in that order already (one query per group, or one group); Phi-3
stacks all q rows, then k, then v; the others store q, k and v separately. Experts are stacked on a
leading axis [n_expert, ...]; Mixtral files hold one tensor per expert.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from lightjax.model.config import ModelConfig

Fn = Callable[..., tuple[np.ndarray, ...]]


@dataclasses.dataclass(frozen=True)
class Entry:
    """HF tensors `sources` <-> lightjax parameters `targets` ('/'-joined paths): `fn` maps the
    source arrays to the target arrays, `inv` maps them back."""

    sources: tuple[str, ...]
    targets: tuple[str, ...]
    fn: Fn
    inv: Fn


def _copy(src: str, tgt: str) -> Entry:
    return Entry((src,), (tgt,), lambda x: (np.asarray(x),), lambda x: (np.asarray(x),))


def _linear(src: str, tgt: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Entry:
    """torch Linear weight [out, in] <-> kernel [*in_shape, *out_shape]."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    return Entry((src,), (tgt,), lambda w: (np.asarray(w).T.reshape(in_shape + out_shape),),
                 lambda k: (np.asarray(k).reshape(n_in, n_out).T,))


def _dense(cfg_bias: bool, src: str, tgt: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> list[Entry]:
    entries = [_linear(f"{src}.weight", f"{tgt}/kernel", in_shape, out_shape)]
    if cfg_bias:
        entries.append(Entry((f"{src}.bias",), (f"{tgt}/bias",), lambda b: (np.asarray(b).reshape(out_shape),),
                             lambda b: (np.asarray(b).reshape(-1),)))
    return entries


def _qkv(cfg: ModelConfig, sources: tuple[str, ...], tgt: str, weight: bool) -> Entry:
    """Separate q, k, v (or Phi-3's one stacked tensor) <-> the grouped qkv kernel or bias."""
    g, qpk, hs = cfg.n_query_groups, cfg.q_per_kv, cfg.head_size
    sizes = (g * qpk * hs, g * hs, g * hs)

    def fuse(*parts: np.ndarray) -> tuple[np.ndarray]:
        if len(parts) == 1:  # stacked rows: q, then k, then v
            parts = np.split(np.asarray(parts[0]), np.cumsum(sizes)[:2], axis=0)
        parts = [np.asarray(p).T if weight else np.asarray(p) for p in parts]  # weights: input axis first
        lead = parts[0].shape[:-1]
        q, k, v = (p.reshape(*lead, g, n, hs) for p, n in zip(parts, (qpk, 1, 1), strict=True))
        return (np.concatenate([q, k, v], axis=-2),)

    def split(x: np.ndarray) -> tuple[np.ndarray, ...]:
        x = np.asarray(x)
        lead = x.shape[:-3]
        parts = [x[..., :qpk, :], x[..., qpk:qpk + 1, :], x[..., qpk + 1:, :]]
        parts = [p.reshape(*lead, -1) for p in parts]
        parts = [p.T if weight else p for p in parts]
        return (np.concatenate(parts, axis=0),) if len(sources) == 1 else tuple(parts)

    return Entry(sources, (tgt,), fuse, split)


def _gate_up(src: str, targets: tuple[str, str]) -> Entry:
    """Phi-3's gate_up_proj [2m, d] (gate rows first) <-> fc_1 and fc_2 kernels [d, m]."""
    return Entry((src,), targets, lambda w: tuple(p.T for p in np.split(np.asarray(w), 2, axis=0)),
                 lambda a, b: (np.concatenate([np.asarray(a).T, np.asarray(b).T], axis=0),))


def _experts(sources: tuple[str, ...], tgt: str) -> Entry:
    """One [out, in] weight per expert <-> a stacked kernel [n_expert, in, out]."""
    return Entry(sources, (tgt,), lambda *ws: (np.stack([np.asarray(w).T for w in ws]),),
                 lambda k: tuple(np.asarray(e).T for e in np.asarray(k)))


def _norm(cfg: ModelConfig, src: str, tgt: str) -> list[Entry]:
    entries = [_copy(f"{src}.weight", f"{tgt}/scale")]
    if cfg.norm_class_name == "LayerNorm":
        entries.append(_copy(f"{src}.bias", f"{tgt}/bias"))
    return entries


# ------------------------------------------------------------------------------------------------
# The tables, one function per layout.
# ------------------------------------------------------------------------------------------------


def _llama_layer(cfg: ModelConfig, model_type: str, p: str, t: str) -> list[Entry]:
    """Llama and the architectures that share its module names."""
    d, n, hs, m = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.intermediate_size
    gemma2 = model_type in ("gemma2", "gemma3_text")
    entries = []
    if cfg.norm_1:
        entries += _norm(cfg, f"{p}.input_layernorm", f"{t}/norm_1")
    if cfg.norm_2:
        entries += _norm(cfg, f"{p}.pre_feedforward_layernorm" if gemma2 else f"{p}.post_attention_layernorm",
                         f"{t}/norm_2")
    if cfg.post_attention_norm:
        entries += _norm(cfg, f"{p}.post_attention_layernorm", f"{t}/post_attention_norm")
    if cfg.post_mlp_norm:
        entries += _norm(cfg, f"{p}.post_feedforward_layernorm", f"{t}/post_mlp_norm")
    a = f"{p}.self_attn"
    qkv = (f"{a}.qkv_proj",) if model_type == "phi3" else (f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj")
    entries.append(_qkv(cfg, tuple(f"{x}.weight" for x in qkv), f"{t}/attn/qkv/kernel", weight=True))
    if cfg.bias or cfg.attn_bias:
        entries.append(_qkv(cfg, tuple(f"{x}.bias" for x in qkv), f"{t}/attn/qkv/bias", weight=False))
    entries += _dense(cfg.bias, f"{a}.o_proj", f"{t}/attn/proj", (n, hs), (d,))
    if cfg.norm_qk:
        entries += [_copy(f"{a}.q_norm.weight", f"{t}/attn/norm_q/scale"),
                    _copy(f"{a}.k_norm.weight", f"{t}/attn/norm_k/scale")]
    if model_type == "mixtral":
        moe, experts = f"{p}.block_sparse_moe", range(cfg.n_expert)
        entries.append(_linear(f"{moe}.gate.weight", f"{t}/mlp/gate/kernel", (d,), (cfg.n_expert,)))
        for hf_name, ours in (("w1", "fc_1"), ("w3", "fc_2"), ("w2", "proj")):
            names = tuple(f"{moe}.experts.{e}.{hf_name}.weight" for e in experts)
            entries.append(_experts(names, f"{t}/mlp/{ours}"))
    elif model_type == "phi3":
        entries.append(_gate_up(f"{p}.mlp.gate_up_proj.weight", (f"{t}/mlp/fc_1/kernel", f"{t}/mlp/fc_2/kernel")))
        entries += _dense(cfg.bias, f"{p}.mlp.down_proj", f"{t}/mlp/proj", (m,), (d,))
    else:
        entries += _dense(cfg.bias, f"{p}.mlp.gate_proj", f"{t}/mlp/fc_1", (d,), (m,))
        entries += _dense(cfg.bias, f"{p}.mlp.up_proj", f"{t}/mlp/fc_2", (d,), (m,))
        entries += _dense(cfg.bias, f"{p}.mlp.down_proj", f"{t}/mlp/proj", (m,), (d,))
    return entries


def _gpt_neox_layer(cfg: ModelConfig, model_type: str, p: str, t: str) -> list[Entry]:
    d, n, hs, m = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.intermediate_size
    return [
        *_norm(cfg, f"{p}.input_layernorm", f"{t}/norm_1"),
        *_norm(cfg, f"{p}.post_attention_layernorm", f"{t}/norm_2"),
        *_dense(True, f"{p}.attention.query_key_value", f"{t}/attn/qkv", (d,), (n, 3, hs)),
        *_dense(True, f"{p}.attention.dense", f"{t}/attn/proj", (n, hs), (d,)),
        *_dense(True, f"{p}.mlp.dense_h_to_4h", f"{t}/mlp/fc", (d,), (m,)),
        *_dense(True, f"{p}.mlp.dense_4h_to_h", f"{t}/mlp/proj", (m,), (d,)),
    ]


def _phi_layer(cfg: ModelConfig, model_type: str, p: str, t: str) -> list[Entry]:
    d, n, hs, m = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.intermediate_size
    qkv = tuple(f"{p}.self_attn.{x}_proj" for x in "qkv")
    return [
        *_norm(cfg, f"{p}.input_layernorm", f"{t}/norm_1"),
        _qkv(cfg, tuple(f"{x}.weight" for x in qkv), f"{t}/attn/qkv/kernel", weight=True),
        _qkv(cfg, tuple(f"{x}.bias" for x in qkv), f"{t}/attn/qkv/bias", weight=False),
        *_dense(True, f"{p}.self_attn.dense", f"{t}/attn/proj", (n, hs), (d,)),
        *_dense(True, f"{p}.mlp.fc1", f"{t}/mlp/fc", (d,), (m,)),
        *_dense(True, f"{p}.mlp.fc2", f"{t}/mlp/proj", (m,), (d,)),
    ]


def _falcon_layer(cfg: ModelConfig, model_type: str, p: str, t: str) -> list[Entry]:
    d, n, hs, m = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.intermediate_size
    if cfg.shared_attention_norm:
        norms = _norm(cfg, f"{p}.input_layernorm", f"{t}/norm_1")
    elif cfg.parallel_residual:  # the new decoder architecture: one norm per branch
        norms = _norm(cfg, f"{p}.ln_attn", f"{t}/norm_1") + _norm(cfg, f"{p}.ln_mlp", f"{t}/norm_2")
    else:
        norms = _norm(cfg, f"{p}.input_layernorm", f"{t}/norm_1") + _norm(cfg, f"{p}.post_attention_layernorm",
                                                                          f"{t}/norm_2")
    qkv_out = (cfg.n_query_groups, cfg.q_per_kv + 2, hs)
    return [
        *norms,
        *_dense(cfg.bias, f"{p}.self_attention.query_key_value", f"{t}/attn/qkv", (d,), qkv_out),
        *_dense(cfg.bias, f"{p}.self_attention.dense", f"{t}/attn/proj", (n, hs), (d,)),
        *_dense(cfg.bias, f"{p}.mlp.dense_h_to_4h", f"{t}/mlp/fc", (d,), (m,)),
        *_dense(cfg.bias, f"{p}.mlp.dense_4h_to_h", f"{t}/mlp/proj", (m,), (d,)),
    ]


# model_type family -> (embedding, layer prefix, layer table, final norm, output head)
_LAYOUTS = {
    "llama": ("model.embed_tokens", "model.layers", _llama_layer, "model.norm", "lm_head"),
    "gpt_neox": ("gpt_neox.embed_in", "gpt_neox.layers", _gpt_neox_layer, "gpt_neox.final_layer_norm", "embed_out"),
    "phi": ("model.embed_tokens", "model.layers", _phi_layer, "model.final_layernorm", "lm_head"),
    "falcon": ("transformer.word_embeddings", "transformer.h", _falcon_layer, "transformer.ln_f", "lm_head"),
}
# transformers >= 5 renames GPT-NeoX's `embed_out` to `lm_head` in memory; Hub files keep `embed_out`.
_RENAMES = {"gpt_neox": (re.compile(r"^lm_head\."), "embed_out.")}
# Buffers that older checkpoints saved next to the weights; they are recomputed, never loaded.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|attention\.bias|attention\.masked_bias)$")


def entries(cfg: ModelConfig, model_type: str) -> list[Entry]:
    """The whole table for `cfg` stored as HF architecture `model_type`."""
    embed, layers, layer, final_norm, head = _LAYOUTS.get(model_type, _LAYOUTS["llama"])
    out = [_copy(f"{embed}.weight", "wte/embedding")]
    for i in range(cfg.n_layer):
        out += layer(cfg, model_type, f"{layers}.{i}", f"h_{i}")
    out += _norm(cfg, final_norm, "ln_f")
    if not cfg.tie_embeddings:
        out += _dense(cfg.lm_head_bias, head, "lm_head", (cfg.n_embd,), (cfg.padded_vocab_size,))
    return out


def tied_head_name(model_type: str) -> str:
    return f"{_LAYOUTS.get(model_type, _LAYOUTS['llama'])[4]}.weight"


def normalise_names(state_dict: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """Hub names for the tensors of a state dict (in-memory renames undone, buffers dropped)."""
    pattern, repl = _RENAMES.get(model_type, (None, None))
    out = {}
    for k, v in state_dict.items():
        if not _IGNORED.search(k):
            out[pattern.sub(repl, k) if pattern else k] = v
    return out


def memory_name(name: str, model_type: str) -> str:
    """The name a module has in transformers' model in memory (where PEFT adapters name it), for its name
    in the Hub's files: GPT-NeoX's `embed_out` is `lm_head` in transformers >= 5."""
    return "lm_head" if model_type == "gpt_neox" and name == "embed_out" else name


def get_path(tree: Mapping[str, Any], path: str) -> Any:
    for key in path.split("/"):
        tree = tree[key]
    return tree


def set_path(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value
