"""Weight import and export between lightjax and other formats (Hugging Face)."""

from lightjax.convert.hf import (
    SUPPORTED_MODEL_TYPES,
    config_from_hf,
    config_to_hf,
    load_hf_checkpoint,
    params_from_hf,
    params_to_hf,
    save_hf_checkpoint,
)

__all__ = ["SUPPORTED_MODEL_TYPES", "config_from_hf", "config_to_hf", "load_hf_checkpoint", "params_from_hf",
           "params_to_hf", "save_hf_checkpoint"]
