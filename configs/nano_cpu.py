"""nanoGPT's documented CPU recipe: its config/train_shakespeare_char.py with the README's CPU
overrides (4 layers, 4 heads, 128 wide, block 64, batch 12, 2000 steps, lr 1e-3 after 100 warmup
steps decaying to 1e-4 at step 2000, AdamW (0.9, 0.99), weight decay 0.1 on every matrix including
the embeddings, clip 1.0, dropout 0, char-level, eval every 250 steps over 20 batches).

Differences from nanoGPT: rotary position embeddings on whole heads instead of learned absolute
ones (lightjax models use RoPE), and evaluation over the first 20 validation batches rather than 20
random ones. nanoGPT reports a validation loss of about 1.88 for this recipe; it should reach <= 1.88.
"""

from lightjax.train.config import default_config


def get_config():
    c = default_config()
    # nanoGPT's CPU model: 4 layers, 4 heads, 128 wide, block 64, sequential blocks.
    c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size = 4, 4, 128, 64
    c.model.parallel_residual = False  # nanoGPT's blocks are sequential
    c.model.rotary_percentage = 1.0  # RoPE on whole heads, where nanoGPT has learned positions
    c.data.seq_len = 64
    c.optim.warmup_steps = 100
    c.optim.b2 = 0.99  # nanoGPT's choice for a small char-level model
    c.optim.no_decay = ("bias", "scale")  # nanoGPT decays every 2-D parameter, embeddings included
    c.train.global_batch_size = 12
    c.train.max_steps = 2000
    c.train.log_every = 50
    return c
