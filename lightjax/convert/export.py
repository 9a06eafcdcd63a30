"""lightjax's export format: a model's parameters without optimizer state, for inference, conversion and
fine-tuning from (config.train.init_from).

    OUT/params              Orbax (one array per parameter, cast to the export's dtype)
    OUT/model_config.json   the resolved ModelConfig, with the step and dtype it was exported at

`scripts/export.py` writes it from a run's checkpoint (train/export.py), `scripts/convert_hf.py import`
from a Hugging Face directory; `load_weights` reads either an export or a Hugging Face directory.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from lightjax.convert.hf import load_hf_checkpoint
from lightjax.convert.peft import is_peft_dir, peft_base
from lightjax.model.config import ModelConfig
from lightjax.model.gpt import unstack_layers
from lightjax.runtime.files import absolute

EXPORT_DTYPES = ("float32", "bfloat16")


def save_exported(out: str | epath.PathLike, cfg: Any, params: Any, dtype: str = "float32",
                  step: int = 0) -> epath.Path:
    """OUT/params (Orbax, cast to `dtype`, loop or scan layout as given) and OUT/model_config.json:
    the export format, also written by `scripts/convert_hf.py import`."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(EXPORT_DTYPES)}.")
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype=dtype), params)
    out = absolute(out)
    out.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out / "params", params, force=True)
    checkpointer.wait_until_finished()
    (out / "model_config.json").write_text(json.dumps({"step": step, "dtype": dtype, **cfg.to_dict()}, indent=1))
    return out


def load_weights(directory: str | epath.PathLike) -> tuple[Any, Any]:
    """(ModelConfig, params in loop layout) from an export directory or a Hugging Face model directory; for
    a PEFT adapter folder, its base model's (peft.read_adapters reads the adapters)."""
    if is_peft_dir(directory):
        return load_weights(peft_base(directory))
    if (epath.Path(directory) / "model_config.json").is_file():
        cfg, params = load_exported(directory)
        return cfg, (unstack_layers(params) if "h" in params else params)
    return load_hf_checkpoint(directory)


def load_exported(directory: str | epath.PathLike) -> tuple[Any, Any]:
    """(ModelConfig, params) from an `export_params` directory."""
    directory = absolute(directory)
    if not (directory / "model_config.json").is_file():
        raise FileNotFoundError(f"No model_config.json in {directory}: not a lightjax export directory.")
    fields = json.loads((directory / "model_config.json").read_text())
    fields.pop("step"), fields.pop("dtype")
    params = ocp.StandardCheckpointer().restore(directory / "params")
    return ModelConfig(**fields), params
