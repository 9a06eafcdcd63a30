"""Weight import and export between lightjax and other formats (Hugging Face)."""

from lightjax.convert.hf import config_from_hf, config_to_hf, load_hf_checkpoint, params_from_hf

__all__ = ["config_from_hf", "config_to_hf", "load_hf_checkpoint", "params_from_hf"]
