"""lightjax: LitGPT-style GPT training in JAX/Flax."""

import os as _os

# XLA:CPU options that make lightjax's steps faster on a CPU (measured: README, "Speed on a CPU"). They
# touch the CPU backend only, take effect when JAX starts it (after this import), and a value already
# in XLA_FLAGS wins: the many tiny ops of a small model's step lose more to Eigen's thread hand-offs
# than they gain from them, and the large ops run in XLA's own parallel loops and matmul library.
CPU_XLA_FLAGS = {"--xla_cpu_multi_thread_eigen": "false"}
_flags = _os.environ.get("XLA_FLAGS", "")
_missing = [f"{name}={value}" for name, value in CPU_XLA_FLAGS.items() if name not in _flags]
_os.environ["XLA_FLAGS"] = " ".join([_flags, *_missing]).strip()

from lightjax.model import GPT  # noqa: E402
from lightjax.model_config import ModelConfig  # noqa: E402

__version__ = "0.1.0"
__all__ = ["GPT", "ModelConfig", "CPU_XLA_FLAGS", "__version__"]
