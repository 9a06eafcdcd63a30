"""lightjax: LitGPT-style GPT training in JAX/Flax."""

from lightjax.config import ModelConfig
from lightjax.model import GPT

__version__ = "0.1.0"
__all__ = ["GPT", "ModelConfig", "__version__"]
