"""Llama-3.2-1B-shaped pretraining for real hardware: bf16 compute, FSDP over all devices with tensor
parallelism 1 (raise mesh.tensor on large pods), scanned and rematerialised layers, a TFDS corpus.

    python scripts/train.py --config configs/llama_1b.py --config.data.data_dir=/data/tfds --workdir gs://BUCKET/run \\
        --config.data.tokenizer=spm:PATH/tokenizer.model --config.model.vocab_size=32000

Sized for a TPU v5p-8 / 8 x H100: 512 x 2048 = 1M tokens per step.
"""

from lightjax.run_config import default_config


def get_config():
    c = default_config()
    c.model.name = "Llama-3.2-1B"
    c.data.source = "tfds:c4/en"
    c.data.tokenizer = "byte"
    c.data.seq_len = 2048
    c.data.num_workers = 8
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    c.optim.lr, c.optim.min_lr, c.optim.warmup_steps, c.optim.b2, c.optim.schedule = 3e-4, 3e-5, 2000, 0.95, "wsd"
    c.train.global_batch_size = 512
    c.train.max_steps = 50000
    c.train.dtype, c.train.param_dtype = "bfloat16", "float32"
    c.train.remat = "full"
    c.train.scan_layers = True
    c.train.z_loss = 1e-4
    c.train.eval_every, c.train.eval_batches, c.train.log_every = 1000, 50, 50
    c.checkpoint.save_every = 1000
    return c
