"""A run's checkpoint exported: its parameters (LoRA adapters merged) in lightjax's export format
(convert/export.py), or a LoRA run's adapters alone."""

from __future__ import annotations

import json

import numpy as np
from etils import epath
from flax import traverse_util

from lightjax.convert.export import EXPORT_DTYPES, save_exported
from lightjax.convert.safetensors_io import write_safetensors
from lightjax.model import lora
from lightjax.model.gpt import unstack_layers
from lightjax.runtime.files import absolute, check_output_dir, staged_dir
from lightjax.train.checkpoint import restore_model, restore_params
from lightjax.train.config import resolve_model_config


def export_params(workdir: str | epath.PathLike, out: str | epath.PathLike, step: int | str | None = None,
                  dtype: str = "float32", overwrite: bool = False) -> epath.Path:
    """Parameters only (no optimizer state; LoRA adapters merged), cast to `dtype`, for inference and
    conversion: OUT/params (Orbax), OUT/model_config.json (the resolved ModelConfig), OUT/tokenizer/."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(EXPORT_DTYPES)}.")
    check_output_dir(out, "export", overwrite)  # before the checkpoint is read
    cfg, params, step, _ = restore_model(workdir, step)
    with staged_dir(out, "export", overwrite) as stage:  # a failed export leaves no half-written folder
        save_exported(stage, cfg, params, dtype, step)
        tokenizer = epath.Path(workdir) / "tokenizer"
        if tokenizer.is_dir():
            (stage / "tokenizer").mkdir(parents=True, exist_ok=True)
            for f in tokenizer.iterdir():
                f.copy(stage / "tokenizer" / f.name, overwrite=True)
    return absolute(out)


def export_adapters(workdir: str | epath.PathLike, out: str | epath.PathLike,
                    step: int | str | None = None, overwrite: bool = False) -> epath.Path:
    """A LoRA run's adapters alone: OUT/adapters.safetensors (every lora_a and lora_b in float32, named by
    its path, e.g. h_0/attn/qkv/lora_a, loop layout) and OUT/lora_config.json (rank, alpha, dropout,
    targets, the base model and the weights the run started from)."""
    check_output_dir(out, "adapters", overwrite)
    config, params, _ = restore_params(workdir, step)
    cfg = resolve_model_config(config)
    adapters = lora.split(unstack_layers(params) if "h" in params else params)[0]
    if not adapters:
        raise ValueError(f"{workdir} has no LoRA adapters to export (its config.lora.rank is 0).")
    tensors = {"/".join(k): np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(adapters).items()}
    meta = {"rank": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout, "targets": list(cfg.lora_targets),
            "base_model": cfg.name, "base_weights": config.train.init_from}
    with staged_dir(out, "adapters", overwrite) as stage:
        write_safetensors(stage / "adapters.safetensors", tensors)
        (stage / "lora_config.json").write_text(json.dumps(meta, indent=1))
    return absolute(out)
