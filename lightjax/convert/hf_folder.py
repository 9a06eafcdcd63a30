"""What a model folder says beyond its weights, carried from the model a run starts from into its exports,
so that an export is the base model's folder with new weights.

- The base's own description, kept as Hugging Face wrote it: `config.json` (its special token ids and
  every field lightjax does not own) and `generation_config.json` (EOS and sampling defaults). A run that
  starts from a model (`train.init_from`) keeps them in WORKDIR/base/, an export in OUT/base/ (an import
  of a Hugging Face folder too); a Hugging Face export writes them back with the run's architecture.
- The tokenizer's files (tokenizer_config.json, chat templates, ...) travel with the run's tokenizer
  (data/tokenizers.py HF_COMPANION_FILES).

`model_config_of(folder)` reads the architecture of a Hugging Face folder (config.json), a lightjax export
(model_config.json) or a PEFT adapter folder (its base model's): what `config.model.name=hf:DIR` uses.
This module imports no JAX: the run config resolves model names through it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from etils import epath

from lightjax.convert.hf_config import config_from_hf, config_to_hf
from lightjax.model.config import ModelConfig

BASE_DIR = "base"  # in a run and an export: the base model's own files
BASE_FILES = ("config.json", "generation_config.json")
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
EXPORT_CONFIG = "model_config.json"  # a lightjax export's ModelConfig
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter folder's

# config.json keys that describe the architecture in other spellings than config_to_hf writes (older
# transformers, other families): dropped from the base, whose architecture the run's replaces.
_ARCHITECTURE_ALIASES = ("rope_parameters", "rope_scaling", "rotary_pct", "rotary_emb_base", "layer_types",
                         "sliding_window_pattern", "use_sliding_window", "max_window_layers", "hidden_activation",
                         "activation", "num_kv_heads", "n_head", "n_layer", "torch_dtype", "dtype")


def read_json(path: str | epath.PathLike) -> dict[str, Any]:
    """A JSON object file; a ValueError naming the file when it is not one."""
    try:
        data = json.loads(epath.Path(path).read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object.")
    return data


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    """A Hugging Face folder's config.json."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"No config.json in {directory}: not a Hugging Face model directory.")
    return read_json(path)


def base_config(folder: str | epath.PathLike) -> dict[str, Any] | None:
    """The config.json of the model a run or an export descends from (None: it started from scratch);
    exports made before base/ existed kept it as hf_config.json."""
    folder = epath.Path(folder)
    for path in (folder / BASE_DIR / "config.json", folder / "hf_config.json"):
        if path.is_file():
            return read_json(path)
    return None


def keep_base_files(source: str | epath.PathLike, target: str | epath.PathLike) -> None:
    """Copy the base files of `source` into `target`/base/: a Hugging Face folder's config.json and
    generation_config.json, the base/ of a lightjax export or run, or a PEFT adapter's base model's.
    Nothing when it has none."""
    source, into = epath.Path(source), epath.Path(target) / BASE_DIR
    if (source / ADAPTER_CONFIG).is_file() and not (source / "config.json").is_file():
        source = epath.Path(read_json(source / ADAPTER_CONFIG).get("base_model_name_or_path") or source)
    files = {name: source / name for name in BASE_FILES}
    if (source / BASE_DIR).is_dir():
        files = {name: source / BASE_DIR / name for name in BASE_FILES}
    elif not (source / "config.json").is_file():
        files = {"config.json": source / "hf_config.json"}  # an export from before base/
    files = {name: path for name, path in files.items() if path.is_file()}
    if files:
        into.mkdir(parents=True, exist_ok=True)
    for name, path in files.items():
        path.copy(into / name, overwrite=True)


def export_config(cfg: ModelConfig, model_type: str, base: dict[str, Any] | None, torch_dtype: str,
                  token_ids: dict[str, Any]) -> dict[str, Any]:
    """The config.json of an export: the base's (special ids, every field lightjax does not own) with
    the run's architecture over it; without a base, the tokenizer's special ids."""
    arch = config_to_hf(cfg, model_type)
    out = {k: v for k, v in (base or {}).items() if k not in arch and k not in _ARCHITECTURE_ALIASES}
    out.update({k: v for k, v in arch.items() if k not in SPECIAL_IDS})
    for key in SPECIAL_IDS:
        out[key] = (base or {}).get(key, token_ids.get(key))
    out["torch_dtype"] = torch_dtype
    return out


def generation_config(token_ids: dict[str, Any]) -> dict[str, Any]:
    """A generation_config.json for an export whose base had none: where generation starts and stops."""
    return {k: v for k, v in token_ids.items() if k in SPECIAL_IDS and v is not None}


def model_config_of(folder: str | Path, **overrides: Any) -> ModelConfig:
    """The architecture a folder describes: a Hugging Face model folder (config.json), a lightjax export
    (model_config.json) or a PEFT adapter folder (its base model's), with `overrides` on top."""
    folder = Path(folder)
    if (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file():
        base = read_json(folder / ADAPTER_CONFIG).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{folder / ADAPTER_CONFIG} names no base_model_name_or_path.")
        return model_config_of(base, **overrides)
    if (folder / EXPORT_CONFIG).is_file():
        fields = read_json(folder / EXPORT_CONFIG)
        fields.pop("step", None), fields.pop("dtype", None)
    elif (folder / "config.json").is_file():
        try:
            fields = config_from_hf(read_hf_config(folder)).to_dict()
        except ValueError as e:
            raise ValueError(f"{folder / 'config.json'}: {e}") from None
    elif folder.is_dir():
        raise FileNotFoundError(f"{folder} holds no config.json, {EXPORT_CONFIG} or {ADAPTER_CONFIG}: not a model "
                                "folder.")
    else:
        raise FileNotFoundError(f"{folder} does not exist.")
    if "vocab_size" in overrides and "padded_vocab_size" not in overrides:
        fields["padded_vocab_size"] = None  # padded anew for the new vocabulary
    return ModelConfig(**{**fields, **overrides})
