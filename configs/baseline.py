"""The baseline: `baseline-tiny` (6 layers, 6 heads, 384 wide, block 256, parallel
residual, rotary 0.25) trained char-level on Tiny Shakespeare with AdamW (0.9, 0.95), lr 1e-3 after
200 warmup steps with cosine decay, 8192 tokens per step (32 x 256), float32, 3000 steps, eval every
250 steps, seed 1337. Target: validation loss <= 1.55 (results in the README).
"""

from lightjax.run_config import default_config


def get_config():
    c = default_config()
    c.model.name = "baseline-tiny"
    c.data.source = "tiny_shakespeare"
    c.data.tokenizer = "char"
    c.data.seq_len = 256
    c.optim.lr = 1e-3
    c.optim.min_lr = 1e-4
    c.optim.warmup_steps = 200
    c.optim.schedule = "cosine"
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.train.seed = 1337
    c.train.global_batch_size = 32
    c.train.max_steps = 3000
    c.train.eval_every = 250
    c.train.dtype = "float32"
    return c
