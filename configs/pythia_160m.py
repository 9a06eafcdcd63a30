"""Pythia-160M (GPT-NeoX) pretraining for real hardware: bf16 compute with float32 parameters, FSDP
over all devices, sequences of 2048 from a TFDS text corpus prepared in ArrayRecord format.

    python scripts/train.py --config configs/pythia_160m.py --config.data.data_dir=/data/tfds --workdir gs://BUCKET/run

Byte-level tokens by default (no download needed); point data.tokenizer at a SentencePiece model
for subwords. 256 x 2048 = 524k tokens per step, in 2 micro-batches with full remat: what fits a TPU
v5e-8's 16 GB chips (10.4 GiB peak, compiled with scripts/shard_sweep.py --topology v5e-8); on one GPU, raise
train.grad_accum_steps.
"""

from lightjax.train.config import default_config


def get_config():
    c = default_config()
    c.model.name = "pythia-160m"
    c.data.source = "tfds:c4/en"  # a web-scale corpus for a model of this size
    c.data.tokenizer = "byte"  # needs no tokenizer files
    c.data.seq_len = 2048
    c.data.num_workers = 8  # keep the accelerators fed
    c.mesh.data, c.mesh.fsdp = 1, -1  # FSDP over every device
    c.optim.lr, c.optim.min_lr, c.optim.warmup_steps = 6e-4, 6e-5, 1000  # Pythia's own rates
    c.train.global_batch_size = 256  # 0.5M tokens per step
    c.train.max_steps = 20000
    c.train.dtype = "bfloat16"  # compute in bf16, keep float32 master weights
    c.train.grad_accum_steps = 2
    c.train.remat = "full"  # lighter remat needs 16-25 GB a chip at this batch
    c.train.scan_layers = True  # one compiled layer: faster compiles
    c.train.eval_every, c.train.eval_batches, c.train.log_every = 1000, 50, 50
    c.checkpoint.save_every = 1000
    return c
