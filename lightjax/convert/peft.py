"""LoRA adapters in PEFT's format, which PEFT, transformers' `load_adapter` and vLLM read:

    OUT/adapter_config.json        PEFT's LoraConfig: r, lora_alpha, lora_dropout, target_modules (the HF
                                   modules adapted, by full name), base_model_name_or_path
    OUT/adapter_model.safetensors  base_model.model.MODULE.lora_A.weight [r, in] and .lora_B.weight [out, r]

PEFT adds (lora_alpha / r) * x A^T B^T to an adapted torch Linear; lightjax adds (alpha / r) * x A B to a
kernel [in..., out...]. Which rows and columns of which HF weight a kernel's entries land in is read off
the weight tables of hf_weights.py (their `inv`, applied to the entries' indices), so every family's
layout (fused qkv, separate q/k/v, Phi-3's gate_up_proj) is handled by the tables that convert the
weights themselves:

- one lightjax adapter over several HF modules (the fused qkv kernel against q_proj, k_proj, v_proj):
  each module gets the same A and its rows of B, and only the modules of targeted slots are written;
- several lightjax adapters over one HF module (fc_1 and fc_2 against Phi-3's gate_up_proj): their
  ranks are stacked (rank k r, B block-diagonal), said in `rank_pattern` and `alpha_pattern`.

Both are exact. Reading back needs what lightjax can hold: one A per adapter (a PEFT adapter trained
with different A's for q_proj and v_proj does not fold into lightjax's fused qkv adapter and is refused).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import numpy as np
from flax import traverse_util

from lightjax.convert.hf_config import hf_model_type
from lightjax.convert.hf_folder import base_config, read_hf_config
from lightjax.convert.hf_weights import entries, memory_name
from lightjax.convert.safetensors_io import read_safetensors, write_safetensors
from lightjax.model import lora
from lightjax.model.config import ModelConfig
from lightjax.model.gpt import abstract_params

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class _Module:
    """One HF Linear and the lightjax adapters that feed it: for each, its layer path, the HF rows it owns
    with their flat index into B's out axes, and the flat index into A's in axes of every HF column."""

    name: str
    layers: tuple[str, ...]
    rows: tuple[np.ndarray, ...]
    out_index: tuple[np.ndarray, ...]
    in_index: tuple[np.ndarray, ...]
    shape: tuple[int, int]


def _modules(cfg: ModelConfig, model_type: str, adapted: set[str]) -> list[_Module]:
    """Every HF weight that an adapted lightjax layer (path without /kernel) maps into."""
    shapes = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(nn.unbox(abstract_params(cfg))).items()}
    out = []
    for e in entries(cfg, model_type):
        layers = tuple(t.removesuffix("/kernel") for t in e.targets)
        if not any(t.endswith("/kernel") and layer in adapted for t, layer in zip(e.targets, layers, strict=True)):
            continue
        offsets = np.cumsum([0] + [math.prod(shapes[t]) for t in e.targets])
        probes = [np.arange(lo, hi, dtype=np.int64).reshape(shapes[t])
                  for t, lo, hi in zip(e.targets, offsets[:-1], offsets[1:], strict=True)]
        in_sizes = [math.prod(shapes[f"{layer}/lora_a"][:-1]) if layer in adapted else 1 for layer in layers]
        for source, placed in zip(e.sources, e.inv(*probes), strict=True):
            out.append(_module(memory_name(source.removesuffix(".weight"), model_type), np.asarray(placed),
                               layers, offsets, in_sizes, adapted))
    return out


def _module(name: str, placed: np.ndarray, layers: tuple[str, ...], offsets: np.ndarray, in_sizes: list[int],
            adapted: set[str]) -> _Module:
    """Decode the kernel indices `placed` [out, in] of one HF weight into rows and in/out indices per layer."""
    owner = np.searchsorted(offsets, placed, side="right") - 1
    keep, rows, outs, ins = [], [], [], []
    for j, layer in enumerate(layers):
        mine = np.nonzero(owner[:, 0] == j)[0]
        if not len(mine) or layer not in adapted:
            continue
        n_out = (offsets[j + 1] - offsets[j]) // in_sizes[j]
        flat = placed[mine] - offsets[j]
        in_index, out_index = flat // n_out, flat % n_out
        if not ((in_index == in_index[:1]).all() and (out_index == out_index[:, :1]).all()):
            raise AssertionError(f"{name}: the weight table does not place {layer}'s kernel by rows and columns")
        keep.append(layer)
        rows.append(mine)
        outs.append(out_index[:, 0])
        ins.append(in_index[0])
    return _Module(name, tuple(keep), tuple(rows), tuple(outs), tuple(ins), placed.shape)


def adapters_to_peft(adapters: Mapping[str, Any], cfg: ModelConfig,
                     model_type: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(the adapter tensors by PEFT name, the LoraConfig fields that depend on them) of a LoRA run's
    adapters (loop layout)."""
    adapters = nn.unbox(adapters)
    flat = {"/".join(k[:-1]): {} for k in traverse_util.flatten_dict(adapters)}
    for k, v in traverse_util.flatten_dict(adapters).items():
        flat["/".join(k[:-1])][k[-1]] = np.asarray(v, np.float32)
    qkv = lora.qkv_lora(cfg)
    tensors, targets, ranks, alphas = {}, [], {}, {}
    for m in _modules(cfg, model_type, set(flat)):
        if m.layers == (m.layers[0],) and m.layers[0].endswith("attn/qkv") and not _has_targeted_slot(qkv, flat, m):
            continue  # a module of slots the run did not adapt (k_proj of a query+value run)
        k, r = len(m.layers), cfg.lora_r
        a_hf, b_hf = np.zeros((k * r, m.shape[1]), np.float32), np.zeros((m.shape[0], k * r), np.float32)
        for j, layer in enumerate(m.layers):
            b = flat[layer]["lora_b"]
            b = np.asarray(qkv.mask(b)) if layer.endswith("attn/qkv") and qkv is not None else b
            a_hf[j * r:(j + 1) * r] = flat[layer]["lora_a"].reshape(-1, r)[m.in_index[j]].T
            b_hf[m.rows[j], j * r:(j + 1) * r] = b.reshape(r, -1)[:, m.out_index[j]].T
        tensors[f"{_PREFIX}{m.name}.lora_A.weight"], tensors[f"{_PREFIX}{m.name}.lora_B.weight"] = a_hf, b_hf
        targets.append(m.name)
        if k > 1:  # stacked ranks keep alpha / r
            ranks[m.name], alphas[m.name] = k * r, k * cfg.lora_alpha
    if not tensors:
        raise ValueError("The run has no LoRA adapters to export (its config.lora.rank is 0).")
    return tensors, {"target_modules": targets, "rank_pattern": ranks, "alpha_pattern": alphas}


def _has_targeted_slot(qkv: lora.LoRA | None, flat: Mapping[str, Any], m: _Module) -> bool:
    """Whether any row of qkv module `m` (q_proj, k_proj, v_proj or a fused one) belongs to a targeted slot."""
    if qkv is None or qkv.slots is None:
        return True
    b_shape = flat[m.layers[0]]["lora_b"].shape  # [r, groups, slots, head_size]
    slots = np.broadcast_to(np.asarray(qkv.slots)[None, :, None], b_shape[1:]).reshape(-1)
    return bool(slots[m.out_index[0]].any())


def peft_to_adapters(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    """lightjax adapters (loop layout, float32) from PEFT adapter tensors written for `cfg` (LoRA fields
    set) stored as HF `model_type`; a ValueError naming what does not fold into lightjax's adapters."""
    adapted = {"/".join(k[:-1]) for k in traverse_util.flatten_dict(nn.unbox(abstract_params(cfg)))
               if k[-1] == "lora_a"}
    shapes = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(nn.unbox(abstract_params(cfg))).items()}
    r, out, seen = cfg.lora_r, {}, set()
    for m in _modules(cfg, model_type, adapted):
        name = f"{_PREFIX}{m.name}"
        if f"{name}.lora_A.weight" not in tensors:
            continue
        a_hf, b_hf = tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]
        seen.update({f"{name}.lora_A.weight", f"{name}.lora_B.weight"})
        if a_hf.shape != (r * len(m.layers), m.shape[1]) or b_hf.shape != (m.shape[0], r * len(m.layers)):
            raise ValueError(f"{m.name}: lora_A {a_hf.shape} and lora_B {b_hf.shape} do not fit rank {r} over "
                             f"{len(m.layers)} lightjax layer(s) ({', '.join(m.layers)}): config.lora.rank must "
                             "be the adapter's r.")
        for j, layer in enumerate(m.layers):
            a_shape, b_shape = shapes[f"{layer}/lora_a"], shapes[f"{layer}/lora_b"]
            a = np.zeros((math.prod(a_shape[:-1]), r), np.float32)
            a[m.in_index[j]] = np.asarray(a_hf[j * r:(j + 1) * r], np.float32).T
            got = out.setdefault(layer, {"lora_b": np.zeros((r, math.prod(b_shape[1:])), np.float32)})
            if "lora_a" in got and not np.array_equal(got["lora_a"], a):
                raise ValueError(f"{m.name}: its lora_A differs from the other modules of lightjax's fused {layer} "
                                 "adapter, which has one A for all of them: this adapter cannot be read as a "
                                 "lightjax one.")
            got["lora_a"] = a
            got["lora_b"][:, m.out_index[j]] = np.asarray(b_hf[m.rows[j], j * r:(j + 1) * r], np.float32).T
    unknown = sorted(set(tensors) - seen)
    if unknown:
        raise ValueError(f"The PEFT adapter holds tensors of modules lightjax's LoRA config does not adapt: "
                         f"{', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''}.")
    missing = sorted(adapted - set(out))
    if missing:
        raise ValueError(f"The PEFT adapter has no tensors for the adapted layers {', '.join(missing[:4])} "
                         "(config.lora.targets names more modules than the adapter).")
    return traverse_util.unflatten_dict({
        (*layer.split("/"), name): v.reshape(shapes[f"{layer}/{name}"]) for layer, d in out.items()
        for name, v in d.items()})


def save_peft(out: str | Path, adapters: Mapping[str, Any], cfg: ModelConfig, model_type: str,
              base_model: str = "") -> Path:
    """OUT/adapter_config.json and OUT/adapter_model.safetensors of a LoRA run's adapters."""
    tensors, fields = adapters_to_peft(adapters, cfg, model_type)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model or None,
              "r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout, "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
              "use_dora": False, "modules_to_save": None, **fields}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / WEIGHTS_FILE, tensors)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def is_peft_dir(directory: str | Path) -> bool:
    return (Path(directory) / CONFIG_FILE).is_file()


def peft_base(directory: str | Path) -> str:
    """The base model folder a PEFT adapter names (a local path, as lightjax writes it)."""
    base = json.loads((Path(directory) / CONFIG_FILE).read_text()).get("base_model_name_or_path")
    if not base or not Path(base).is_dir():
        raise ValueError(f"{Path(directory) / CONFIG_FILE}: base_model_name_or_path={base!r} is not a local model "
                         "folder; set it to the base model's folder (a Hugging Face or lightjax export directory).")
    return base


def read_adapters(directory: str | Path, cfg: ModelConfig) -> dict[str, Any]:
    """The LoRA adapters of a PEFT folder as lightjax adapters for `cfg` (a LoRA config), read in the
    architecture its base model is stored as; a ValueError when its r, alpha or targets are not `cfg`'s."""
    config, tensors = load_peft(directory)
    if (config.get("r"), float(config.get("lora_alpha", 0))) != (cfg.lora_r, float(cfg.lora_alpha)):
        raise ValueError(f"{Path(directory) / CONFIG_FILE} has r={config.get('r')}, lora_alpha="
                         f"{config.get('lora_alpha')}; the run's config.lora has rank={cfg.lora_r}, alpha="
                         f"{cfg.lora_alpha}: set them to the adapter's.")
    base = Path(peft_base(directory))
    hf = read_hf_config(base) if (base / "config.json").is_file() else (base_config(base) or {})
    return peft_to_adapters(tensors, cfg, hf_model_type(cfg.replace(lora_r=0), hf.get("model_type")))


def load_peft(directory: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(adapter_config.json, the adapter tensors) of a PEFT LoRA folder; a ValueError for what is not one."""
    directory = Path(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{directory / CONFIG_FILE}: peft_type {config.get('peft_type')!r}; only LoRA adapters "
                         "are read.")
    if config.get("use_dora") or config.get("use_rslora") or config.get("fan_in_fan_out"):
        raise ValueError(f"{directory / CONFIG_FILE}: DoRA, rsLoRA and fan_in_fan_out adapters are not read.")
    return config, read_safetensors(directory / WEIGHTS_FILE)
