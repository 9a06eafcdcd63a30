"""nanoGPT's documented CPU recipe: its config/train_shakespeare_char.py with the README's CPU
overrides (4 layers, 4 heads, 128 wide, block 64, batch 12, 2000 steps, lr 1e-3 after 100 warmup
steps decaying to 1e-4 at step 2000, AdamW (0.9, 0.99), weight decay 0.1 on every matrix including
the embeddings, clip 1.0, dropout 0, char-level, eval every 250 steps over 20 batches).

Differences from nanoGPT: rotary position embeddings on whole heads instead of learned absolute
ones (lightjax models use RoPE), and evaluation over the first 20 validation batches rather than 20
random ones. nanoGPT reports a validation loss of about 1.88 for this recipe; it should reach <= 1.88.
"""

from lightjax.run_config import default_config


def get_config():
    c = default_config()
    c.model.name = "baseline-tiny"
    c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size = 4, 4, 128, 64
    c.model.parallel_residual = False  # nanoGPT's blocks are sequential
    c.model.rotary_percentage = 1.0
    c.model.dropout = 0.0
    c.data.seq_len = 64
    c.optim.lr, c.optim.min_lr, c.optim.warmup_steps, c.optim.schedule = 1e-3, 1e-4, 100, "cosine"
    c.optim.b1, c.optim.b2 = 0.9, 0.99
    c.optim.weight_decay, c.optim.clip_norm = 0.1, 1.0
    c.optim.no_decay = ("bias", "scale")  # nanoGPT decays every 2-D parameter, embeddings included
    c.train.global_batch_size = 12
    c.train.max_steps = 2000
    c.train.eval_every = 250
    c.train.eval_batches = 20
    c.train.log_every = 50
    c.checkpoint.save_every = 500
    return c
