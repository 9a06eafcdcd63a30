"""Pythia-160M pretrained from scratch on FineWeb-Edu's 10B-token sample, with Pythia's own tokenizer:
one epoch of about 10B tokens in 19,000 steps of 256 x 2048 tokens (0.5M a step, llm.c's GPT-2 124M run
on the same data took 19,073 steps of 0.5M).

    pip install -e ".[data]"     # pyarrow reads the Parquet files
    huggingface-cli download HuggingFaceFW/fineweb-edu --repo-type dataset --include "sample/10BT/*" \\
        --local-dir data/fineweb-edu                                   # about 27 GB of Parquet
    huggingface-cli download EleutherAI/pythia-160m tokenizer.json config.json --local-dir tokenizers/pythia
    python scripts/prepare_data.py --config configs/pretrain_fineweb.py --config.data.tokens_dir=tokens/fineweb-edu
    python scripts/train.py --config configs/pretrain_fineweb.py --config.data.tokens_dir=tokens/fineweb-edu \\
        --workdir gs://BUCKET/pythia-160m-fineweb

Preparation tokenizes on every core of every process (several hosts: run it under scripts/launch.py, or
with --distributed on each, into a shared tokens_dir or gs://); training reads the prepared files. On a
TPU v5e-8 the step compiles to 10.4 GiB per chip and an estimated 528-649 ms (0.81-0.99M tokens/s, the
19,000 steps in 2.8-3.4 hours; `scripts/shard_sweep.py --config configs/pretrain_fineweb.py --topology v5e-8
--layouts 1,8,1 --batch 256`); without gradient accumulation or with lighter remat it does not fit there.
"""

from lightjax.train.config import default_config


def get_config():
    c = default_config()
    c.model.name = "pythia-160m"
    c.data.source = "parquet:data/fineweb-edu/sample/10BT/*.parquet"
    c.data.text_field = "text"
    c.data.tokenizer = "hf:tokenizers/pythia"  # 50,277 tokens: uint16 token files, about 20 GB
    c.data.val_fraction = 0.001  # about 10M tokens held out
    c.data.seq_len = 2048
    c.data.num_workers = 8  # keep the accelerators fed
    c.mesh.data, c.mesh.fsdp = 1, -1  # FSDP over every device
    c.optim.lr, c.optim.min_lr, c.optim.warmup_steps = 6e-4, 6e-5, 700
    c.optim.weight_decay = 0.1
    c.train.global_batch_size = 256  # 0.5M tokens per step
    c.train.grad_accum_steps = 2  # with full remat, what fits a v5e-8's 16 GB chips (compiled: 10.4 GiB peak)
    c.train.max_steps = 19000
    c.train.dtype = "bfloat16"  # compute in bf16, keep float32 master weights
    c.train.remat = "full"
    c.train.scan_layers = True
    c.train.eval_every, c.train.eval_batches, c.train.log_every = 500, 50, 50
    c.checkpoint.save_every = 1000
    return c
