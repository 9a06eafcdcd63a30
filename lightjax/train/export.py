"""A run's checkpoint, or an export, written for use elsewhere: its parameters (LoRA adapters merged) in
lightjax's export format (convert/export.py) or as a Hugging Face folder, or a LoRA run's adapters alone in
PEFT's format. Each output is the folder of the model the run started from with new weights: the base's
config.json fields and generation_config.json, and the tokenizer's files, are carried (convert/hf_folder.py)."""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath

from lightjax.convert.export import EXPORT_DTYPES, load_exported, save_exported
from lightjax.convert.hf import hf_model_type, load_hf_checkpoint, save_hf_checkpoint
from lightjax.convert.hf_folder import BASE_DIR, SPECIAL_IDS, base_config, generation_config, keep_base_files
from lightjax.convert.peft import save_peft
from lightjax.data.tokenizers import load_hf_tokenizer, load_tokenizer, save_hf_tokenizer
from lightjax.model import lora
from lightjax.model.config import ModelConfig
from lightjax.model.gpt import unstack_layers
from lightjax.runtime.files import absolute, check_output_dir, staged_dir, write_atomic
from lightjax.train.checkpoint import restore_model, restore_params
from lightjax.train.config import resolve_model_config


def _check_dtype(dtype: str) -> None:
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(EXPORT_DTYPES)}.")


def _copy_folder(source: epath.Path, target: epath.Path) -> None:
    if source.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        for f in source.iterdir():
            if f.is_dir():
                _copy_folder(f, target / f.name)
            else:
                f.copy(target / f.name, overwrite=True)


def export_params(workdir: str | epath.PathLike, out: str | epath.PathLike, step: int | str | None = None,
                  dtype: str = "float32", overwrite: bool = False) -> epath.Path:
    """Parameters only (no optimizer state; LoRA adapters merged), cast to `dtype`, for inference and
    conversion: OUT/params (Orbax), OUT/model_config.json (the resolved ModelConfig), OUT/tokenizer/ and
    OUT/base/ (the run's)."""
    _check_dtype(dtype)
    check_output_dir(out, "export", overwrite)  # before the checkpoint is read
    cfg, params, step, _ = restore_model(workdir, step)
    workdir = epath.Path(workdir)
    with staged_dir(out, "export", overwrite) as stage:  # a failed export leaves no half-written folder
        save_exported(stage, cfg, params, dtype, step)
        _copy_folder(workdir / "tokenizer", stage / "tokenizer")
        _copy_folder(workdir / BASE_DIR, stage / BASE_DIR)
    return absolute(out)


def export_adapters(workdir: str | epath.PathLike, out: str | epath.PathLike,
                    step: int | str | None = None, overwrite: bool = False) -> epath.Path:
    """A LoRA run's adapters alone, in PEFT's format (convert/peft.py): OUT/adapter_config.json (its base
    model: the weights the run started from) and OUT/adapter_model.safetensors."""
    check_output_dir(out, "adapters", overwrite)
    config, params, _ = restore_params(workdir, step)
    cfg = resolve_model_config(config)
    adapters = lora.split(unstack_layers(params) if "h" in params else params)[0]
    if not adapters:
        raise ValueError(f"{workdir} has no LoRA adapters to export (its config.lora.rank is 0).")
    base = config.train.init_from
    model_type = _model_type(cfg, base_config(workdir))
    with staged_dir(out, "adapters", overwrite) as stage:
        save_peft(stage, adapters, cfg, model_type, str(absolute(base)) if base else "")
    return absolute(out)


def _model_type(cfg: ModelConfig, base: dict[str, Any] | None, asked: str | None = None) -> str:
    """The HF architecture to write: asked for, else the base's, else the first that holds `cfg`."""
    return hf_model_type(cfg.replace(lora_r=0), asked or (base or {}).get("model_type"))


def export_hf(out: str | epath.PathLike, workdir: str | epath.PathLike | None = None,
              export_dir: str | epath.PathLike | None = None, step: int | str | None = None, dtype: str = "float32",
              model_type: str | None = None, overwrite: bool = False) -> str:
    """A run's checkpoint (LoRA adapters merged) or an export as a Hugging Face folder that
    `AutoModelForCausalLM` and `AutoTokenizer` load: model.safetensors, config.json (the base's with the
    run's architecture), generation_config.json and the tokenizer's files. Returns a line saying what."""
    _check_dtype(dtype)
    check_output_dir(out, "hf", overwrite)  # before the weights are read
    if export_dir:
        source = epath.Path(export_dir)
        cfg, params = load_exported(source)
    else:
        source = epath.Path(workdir)
        cfg, params, step, _ = restore_model(source, step)  # LoRA adapters merged
    base = base_config(source)
    model_type = _model_type(cfg, base, model_type)
    token_ids = _token_ids(source / "tokenizer")
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    with staged_dir(out, "hf", overwrite) as stage:  # a failed export leaves no half-written folder
        save_hf_checkpoint(stage, params, cfg, model_type, token_ids, base)
        if (source / BASE_DIR / "generation_config.json").is_file():
            (source / BASE_DIR / "generation_config.json").copy(stage / "generation_config.json")
        elif generation_config(token_ids):
            write_atomic(stage / "generation_config.json", json.dumps(generation_config(token_ids), indent=2) + "\n")
        tokenizer = save_hf_tokenizer(source / "tokenizer", stage)
    return f"Exported {cfg.name} as HF {model_type} ({dtype}) to {absolute(out)}; {tokenizer}."


def _token_ids(tokenizer_dir: epath.Path) -> dict[str, int | None]:
    """The special ids of a saved tokenizer, as config.json names them (empty without a tokenizer)."""
    if not (tokenizer_dir / "tokenizer.json").is_file():
        return {}
    tok = load_tokenizer(tokenizer_dir)
    return dict(zip(SPECIAL_IDS, (tok.bos_id, tok.eos_id, tok.pad_id), strict=True))


def import_hf(hf_dir: str | epath.PathLike, out: str | epath.PathLike, dtype: str = "float32",
              overwrite: bool = False) -> str:
    """A Hugging Face folder as a lightjax export: params, model_config.json, tokenizer/ (with its
    companion files) and base/ (its config.json and generation_config.json). Returns a line saying what."""
    _check_dtype(dtype)
    check_output_dir(out, "export", overwrite)  # before the weights are read
    cfg, params = load_hf_checkpoint(hf_dir)
    with staged_dir(out, "export", overwrite) as stage:  # a failed import leaves no half-written folder
        save_exported(stage, cfg, params, dtype)
        keep_base_files(hf_dir, stage)
        try:
            load_hf_tokenizer(hf_dir).save(stage / "tokenizer")
            tokenizer = "with its tokenizer"
        except FileNotFoundError:
            tokenizer = "without a tokenizer (none in the HF directory)"
    return f"Imported {cfg.name} ({cfg.n_layer} layers, {dtype}) into {absolute(out)}, {tokenizer}."
