"""A tiny model that trains in under a minute on a 2-core CPU: the quick end-to-end check.

2 layers, 4 heads, 64 wide, char-level Tiny Shakespeare, 64 tokens x 16 sequences per step, 100 steps at
a constant learning rate after 10 warmup steps. Trained on the data it reaches a loss around 2.3; its use
is checking that everything runs, not quality. `scripts/smoke_test.py` trains these 100 steps on one
fixed batch instead, where the loss must fall by 95% (it falls by about 99%).
"""

from lightjax.train.config import default_config


def get_config():
    c = default_config()
    # Small enough to overfit one batch in seconds: the smoke test checks wiring, not quality.
    c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size = 2, 4, 64, 64
    c.data.seq_len = 64
    c.optim.lr, c.optim.warmup_steps, c.optim.schedule = 3e-3, 10, "constant"  # no decay within 100 steps
    c.train.global_batch_size = 16
    c.train.max_steps = 100
    c.train.eval_every = 50
    c.train.eval_batches = 4
    c.checkpoint.save_every = 50
    return c
