"""Hugging Face `transformers` checkpoints <-> lightjax: import and export for every supported family.

    cfg, params = load_hf_checkpoint("path/to/hf_model")      # config.json + *.safetensors
    save_hf_checkpoint("out/hf_model", params, cfg)            # loadable by AutoModelForCausalLM

Weights are handled as numpy arrays: no torch is needed either way. The config mapping is in
hf_config.py, the tensor tables in hf_weights.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from lightjax.convert.hf_config import SUPPORTED_MODEL_TYPES, config_from_hf, config_to_hf, hf_model_type
from lightjax.convert.hf_folder import export_config, read_hf_config
from lightjax.convert.hf_weights import entries, get_path, normalise_names, set_path, tied_head_name
from lightjax.convert.safetensors_io import read_safetensors, write_safetensors
from lightjax.model.config import ModelConfig
from lightjax.model.gpt import abstract_params, unstack_layers
from lightjax.runtime.files import write_atomic

__all__ = ["SUPPORTED_MODEL_TYPES", "config_from_hf", "config_to_hf", "hf_model_type", "params_from_hf",
           "params_to_hf", "load_hf_checkpoint", "save_hf_checkpoint", "read_hf_config", "read_hf_state_dict"]


def params_from_hf(state_dict: Mapping[str, np.ndarray], cfg: ModelConfig,
                   model_type: str | None = None) -> dict[str, Any]:
    """lightjax parameters (loop layout, numpy, the checkpoint's dtype) from an HF state dict in the
    Hub's layout (as the safetensors files hold it), for `cfg` stored as `model_type` (default: the
    architecture `cfg` fits first).

    Raises ValueError listing every missing and every unexpected tensor name, or every parameter
    whose shape does not match `cfg`.
    """
    model_type = hf_model_type(cfg, model_type)
    state_dict = normalise_names(state_dict, model_type)
    table = entries(cfg, model_type)
    expected = {name for e in table for name in e.sources}
    given = set(state_dict)
    if cfg.tie_embeddings:  # torch's state_dict() repeats the tied head; safetensors files omit it
        given.discard(tied_head_name(model_type))
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        raise ValueError(f"Cannot convert the {model_type} checkpoint into {cfg.name!r}: "
                         f"missing tensors {_short(missing)}; unexpected tensors {_short(unexpected)}.")
    params: dict[str, Any] = {}
    bad = []
    for e in table:
        tensors = [state_dict[name] for name in e.sources]
        try:
            for target, value in zip(e.targets, e.fn(*tensors), strict=True):
                set_path(params, target, value)
        except ValueError:  # a reshape that cannot work: the checkpoint and the config disagree
            bad.append(f"{'+'.join(e.targets)}: checkpoint {[tuple(t.shape) for t in tensors]} does not fit the config")
    bad += _shape_mismatches(params, cfg)
    if bad:
        raise ValueError(f"Checkpoint shapes do not match ModelConfig {cfg.name!r}: " + "; ".join(bad))
    return params


def params_to_hf(params: Mapping[str, Any], cfg: ModelConfig, model_type: str | None = None) -> dict[str, np.ndarray]:
    """The HF state dict (Hub layout, numpy, the parameters' dtype) of lightjax parameters (loop or
    scan layout, on any devices), for `cfg` stored as `model_type` (default: the first that fits)."""
    model_type = hf_model_type(cfg, model_type)
    params = nn.unbox(params)
    if "h" in params:
        params = unstack_layers(params)
    bad = _shape_mismatches(params, cfg)
    if bad:
        raise ValueError(f"Parameters do not match ModelConfig {cfg.name!r}: " + "; ".join(bad))
    out: dict[str, np.ndarray] = {}
    for e in entries(cfg, model_type):
        values = [np.asarray(jax.device_get(get_path(params, t))) for t in e.targets]
        out.update(zip(e.sources, e.inv(*values), strict=True))
    return out


def _short(names: list[str], limit: int = 12) -> str:
    if not names:
        return "none"
    return str(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _shape_mismatches(params: dict[str, Any], cfg: ModelConfig) -> list[str]:
    want = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params(cfg)))[0]
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    return [f"{jax.tree_util.keystr(path)}: checkpoint {got[path].shape} vs config {tuple(x.shape)}"
            for path, x in want if path in got and got[path].shape != tuple(x.shape)]


def read_hf_state_dict(directory: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF model directory's safetensors files (one file, or the shards listed in
    model.safetensors.index.json), memory-mapped."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = _indexed_files(index)
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No *.safetensors files in {directory} (PyTorch .bin checkpoints are not read; "
                                "re-save them with `save_pretrained(..., safe_serialization=True)`).")
    state_dict: dict[str, np.ndarray] = {}
    for f in files:
        state_dict.update(read_safetensors(f))
    return state_dict


def _indexed_files(index: Path) -> list[Path]:
    """The shard files an index names, each required to be a file inside the index's directory."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = set(weight_map.values())
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{index}: not a safetensors index (a JSON object whose 'weight_map' maps tensor names "
                         "to file names).") from None
    root = index.parent.resolve()
    files = []
    for name in sorted(names):
        path = (root / str(name)).resolve()
        if not isinstance(name, str) or not path.is_relative_to(root) or path == root:
            raise ValueError(f"{index}: shard {name!r} is not a file inside {root}.")
        files.append(path)
    return files


def load_hf_checkpoint(directory: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, params) from a Hugging Face model directory: config.json plus safetensors weights."""
    hf = read_hf_config(directory)
    try:
        cfg = config_from_hf(hf)
    except ValueError as e:
        raise ValueError(f"{Path(directory) / 'config.json'}: {e}") from None
    return cfg, params_from_hf(read_hf_state_dict(directory), cfg, hf["model_type"])


def save_hf_checkpoint(directory: str | Path, params: Mapping[str, Any], cfg: ModelConfig,
                       model_type: str | None = None, token_ids: Mapping[str, Any] | None = None,
                       base: Mapping[str, Any] | None = None) -> Path:
    """Write `config.json` and `model.safetensors` that `transformers.AutoModelForCausalLM
    .from_pretrained(directory)` loads (and `load_hf_checkpoint` reads back). config.json is the `base`
    model's (its special ids and every field lightjax does not own) with `cfg`'s architecture over it
    (hf_folder.export_config); without a base, `token_ids` (bos_token_id, eos_token_id, pad_token_id) give
    the special ids, where generation and tokenizers look for them."""
    model_type = hf_model_type(cfg, model_type)
    state_dict = params_to_hf(params, cfg, model_type)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtypes = {str(v.dtype) for v in state_dict.values()}
    hf = export_config(cfg, model_type, dict(base) if base else None, dtypes.pop() if len(dtypes) == 1 else "float32",
                       dict(token_ids or {}))
    write_safetensors(directory / "model.safetensors", state_dict)
    write_atomic(directory / "config.json", json.dumps(hf, indent=2) + "\n")
    return directory
