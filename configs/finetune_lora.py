"""LoRA fine-tuning of a small pretrained model on Alpaca-style instruction data, as LitGPT's
`finetune_lora`: rank-8 adapters (alpha 16, dropout 0.05) on the query and value projections, every
pretrained weight frozen, the loss on the responses only (prompts masked), Alpaca's prompt template.

    huggingface-cli download EleutherAI/pythia-160m --local-dir checkpoints/EleutherAI/pythia-160m
    curl -L -o data/alpaca.json \\
        https://raw.githubusercontent.com/gururise/AlpacaDataCleaned/main/alpaca_data_cleaned.json
    python scripts/train.py --config configs/finetune_lora.py --workdir runs/lora
    python scripts/generate.py --workdir runs/lora --instruction --prompt "Name three primes." --temperature 0
    python scripts/convert_hf.py export --workdir runs/lora --out hf/pythia-160m-lora   # merged weights

Another model: --config.model.name=NAME with its directory in train.init_from and data.tokenizer
(any LitGPT name the Hugging Face import reads: Llama 3.2, Qwen, Gemma, Phi, ...).
"""

from lightjax.train.config import default_config

WEIGHTS = "checkpoints/EleutherAI/pythia-160m"


def get_config():
    c = default_config()
    c.model.name = "pythia-160m"
    c.train.init_from = WEIGHTS  # a Hugging Face model directory (or a lightjax export)
    c.data.tokenizer = f"hf:{WEIGHTS}"  # the model's own tokenizer
    c.data.source = "json:data/alpaca.json"  # records of instruction, input, output
    c.data.val_fraction = 0.02  # ~1,000 of Alpaca's 52k records
    c.data.seq_len = 512  # longer examples are cut (the trainer says how many)
    c.lora.rank, c.lora.alpha, c.lora.dropout = 8, 16.0, 0.05
    c.lora.targets = ("query", "value")
    c.optim.lr, c.optim.min_lr, c.optim.warmup_steps = 3e-4, 3e-5, 100  # adapters take a larger lr than full tuning
    c.optim.weight_decay = 0.0  # decay would pull the adapters back towards the base model
    c.train.global_batch_size = 16
    c.train.max_steps = 3000  # about one epoch of Alpaca
    c.train.eval_every, c.train.eval_batches = 250, 0  # the whole validation split
    c.checkpoint.save_every = 500
    return c
