"""Preference tuning with DPO and LoRA: a small instruct model on UltraFeedback's binarized pairs, the setting
of TRL's own DPO example (Qwen2-0.5B-Instruct, trl-lib/ultrafeedback_binarized, LoRA rank 32, alpha 16,
lr 5e-6, 16 pairs a step, beta 0.1, one epoch). The reference model is the base with the adapters off,
so no second copy of the weights is held. Each pair is one row: the chosen and the rejected conversation,
each up to half of data.seq_len (TRL's max_length 1024 per side), rendered with the model's chat template.

    huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct --local-dir checkpoints/Qwen/Qwen2.5-0.5B-Instruct
    mkdir -p data/ultrafeedback && python -c "from datasets import load_dataset; \\
        d = load_dataset('trl-lib/ultrafeedback_binarized'); d['train'].to_json('data/ultrafeedback/train.jsonl'); \\
        d['test'].to_json('data/ultrafeedback/validation.jsonl')"
    python scripts/train.py --config configs/dpo_lora.py --workdir runs/dpo
    python scripts/convert_hf.py export --workdir runs/dpo --out hf/qwen2.5-0.5b-dpo   # merged weights

Records are TRL's conversational form: {"chosen": [messages], "rejected": [messages]} sharing every turn
but the assistant's last (also accepted: {"prompt", "chosen", "rejected"} strings, and "prompt" turns
apart). Logged as TRL logs them: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies,
logps/chosen, logps/rejected, and val_... of each on the validation pairs. Full-weight DPO: lora.rank=0,
which holds a frozen copy of the initial weights as the reference (one more copy of the parameters).
"""

from lightjax.train.config import default_config

WEIGHTS = "checkpoints/Qwen/Qwen2.5-0.5B-Instruct"


def get_config():
    c = default_config()
    c.model.name = "Qwen2.5-0.5B"  # the instruct model's architecture
    c.train.init_from = WEIGHTS
    c.data.tokenizer = f"hf:{WEIGHTS}"
    c.data.source = "jsonl:data/ultrafeedback"  # train.jsonl (62k pairs) and validation.jsonl (1k)
    c.data.prompt_style = "chat"  # the model's own chat template
    c.data.seq_len = 2048  # a pair per row: each side up to 1,024 tokens; longer sides are cut (and counted)
    c.preference.beta, c.preference.loss, c.preference.label_smoothing = 0.1, "sigmoid", 0.0
    c.lora.rank, c.lora.alpha, c.lora.dropout = 32, 16.0, 0.05
    c.lora.targets = ("query", "value")  # PEFT's default for Qwen2, as TRL's --use_peft takes it
    c.optim.lr, c.optim.min_lr, c.optim.warmup_steps = 5e-6, 0.0, 100
    c.optim.weight_decay = 0.0  # decay would pull the adapters back towards the base model
    c.train.global_batch_size = 16
    c.train.max_steps = 3800  # about one epoch of the 62k training pairs
    c.train.remat = "full"  # TRL's example runs with gradient checkpointing too
    c.train.eval_every, c.train.eval_batches = 250, 0  # all 1,000 validation pairs
    c.checkpoint.save_every = 500
    return c
