"""lightjax: LitGPT-style GPT training in JAX/Flax."""

from lightjax.model.config import ModelConfig
from lightjax.model.gpt import GPT

__version__ = "0.1.0"
__all__ = ["GPT", "ModelConfig", "__version__"]
