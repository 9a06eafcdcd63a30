"""Llama-3.2-1B-shaped pretraining for real hardware: bf16 compute, FSDP over all devices with tensor
parallelism 1 (raise mesh.tensor on large pods), scanned and rematerialised layers, a TFDS corpus.

    python scripts/train.py --config configs/llama_1b.py --config.data.data_dir=/data/tfds --workdir gs://BUCKET/run \\
        --config.data.tokenizer=spm:PATH/tokenizer.model --config.model.vocab_size=32000

Sized for a TPU v5p-8 / 8 x H100: 512 x 2048 = 1M tokens per step.
"""

from lightjax.train.config import default_config


def get_config():
    c = default_config()
    c.model.name = "Llama-3.2-1B"
    c.data.source = "tfds:c4/en"  # a web-scale corpus: a 1B model would memorise Tiny Shakespeare
    c.data.tokenizer = "byte"  # needs no tokenizer files; use hf:DIR for Llama's own
    c.data.seq_len = 2048
    c.data.num_workers = 8  # keep the accelerators fed
    c.mesh.data, c.mesh.fsdp = 1, -1  # FSDP over every device: the fp32 state (16 B/param) is split
    c.optim.lr, c.optim.min_lr, c.optim.warmup_steps, c.optim.schedule = 3e-4, 3e-5, 2000, "wsd"
    c.train.global_batch_size = 512  # 1M tokens per step
    c.train.max_steps = 50000
    c.train.dtype = "bfloat16"  # compute in bf16, keep float32 master weights
    c.train.remat = "full"  # activations of 16 layers at 2048 tokens would not fit otherwise
    c.train.scan_layers = True  # one compiled layer: faster compiles
    c.train.z_loss = 1e-4  # keeps bf16 logits in range
    c.train.eval_every, c.train.eval_batches, c.train.log_every = 1000, 50, 50
    c.checkpoint.save_every = 1000
    return c
