"""The baseline: `baseline-tiny` (6 layers, 6 heads, 384 wide, block 256, parallel residual,
rotary 0.25) trained char-level on Tiny Shakespeare with AdamW (0.9, 0.95), lr 1e-3 after 200 warmup
steps with cosine decay to 1e-4, 8192 tokens per step (32 x 256), float32, 3000 steps, evaluated every
250 steps, seed 1337. Target: validation loss <= 1.55 (results in the README).

Every key is at its default: `default_config()` is this run, so other configs read as differences
from it.
"""

from lightjax.run_config import default_config


def get_config():
    return default_config()
