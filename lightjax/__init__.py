"""lightjax: LitGPT-style GPT training in JAX/Flax.

`from lightjax import GPT, ModelConfig` gives the model (lightjax/model/); the rest is imported from its
layer's folder: runtime/, model/, data/, cloud/, convert/, train/, perf/, checks/ (see the README).
The two names are imported when first used, so that `import lightjax.train.config` (every config file
does) does not pull in Flax.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["GPT", "ModelConfig", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "GPT":
        from lightjax.model.gpt import GPT

        return GPT
    if name == "ModelConfig":
        from lightjax.model.config import ModelConfig

        return ModelConfig
    raise AttributeError(f"module 'lightjax' has no attribute {name!r}")
