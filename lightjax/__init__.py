"""lightjax: LitGPT-style GPT training in JAX/Flax."""

from lightjax.model import GPT
from lightjax.model_config import ModelConfig

__version__ = "0.1.0"
__all__ = ["GPT", "ModelConfig", "__version__"]
