"""Fine-tuning end to end: instruction data through the trainer and generate.py, a LoRA run's exact
resume, and a LoRA run from Hugging Face weights exported merged so that transformers computes it."""

import json
import math

import jax
import numpy as np
import pytest

from lightjax.convert.hf import config_from_hf, load_hf_checkpoint
from lightjax.convert.peft import load_peft, peft_to_adapters
from lightjax.model import lora
from lightjax.model.gpt import GPT
from lightjax.train.checkpoint import restore_params
from lightjax.train.config import resolve_model_config
from lightjax.train.evaluate import evaluate_run
from lightjax.train.trainer import train
from tests.helpers import load_config, model_overrides, random_hf_model, require_hf, run_script, tiny_run_config
from tests.runs import assert_same_run, losses, run_config

pytestmark = pytest.mark.shakespeare  # reads the local Tiny Shakespeare copy

COLOURS = dict(sky="blue", grass="green", snow="white", coal="black", blood="red", sun="yellow", sea="blue",
               leaf="green", milk="white", night="black", rose="red", lemon="yellow", cloud="grey", plum="purple",
               ash="grey", crow="black")


def val_losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r]


def test_fine_tuning_on_instructions_learns_to_answer_them(tmp_path):
    data = tmp_path / "colours.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"What colour is the {k}?", "output": f"The {k} is {v}."}) + "\n"
                            for k, v in COLOURS.items()))
    c = tiny_run_config()
    c.model.block_size, c.data.seq_len = 256, 224
    c.data.source, c.data.val_fraction = f"jsonl:{data}", 0.125  # the last two records validate
    c.train.max_steps, c.train.eval_every, c.train.eval_batches, c.train.log_every = 300, 50, 0, 50
    c.optim.lr, c.optim.warmup_steps = 3e-3, 10
    c.checkpoint.save_every, c.mesh.data = 0, -1
    workdir = tmp_path / "run"
    train(c, workdir)
    vocab = json.loads((workdir / "tokenizer" / "tokenizer.json").read_text())["chars"]
    # A fresh model predicts about uniformly: ln(vocab) nats per token.
    assert val_losses(workdir)[0] < 0.7 * math.log(len(vocab))
    prompts = ["What colour is the sky?", "What colour is the coal?"]
    out = run_script("generate.py", f"--workdir={workdir}", "--instruction", "--temperature=0", "--max_new_tokens=20",
                     *[f"--prompt={p}" for p in prompts])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "### Instruction:\nWhat colour is the sky?\n\n### Response:\nThe sky is blue." in out.stdout
    assert "### Response:\nThe coal is black." in out.stdout
    # scripts/evaluate.py's loss over the validation records: the trainer's last, response tokens only.
    row = evaluate_run(workdir, write=False)
    assert row["eval_loss"] == pytest.approx(val_losses(workdir)[-1], rel=1e-5)
    assert row["eval_tokens"] == sum(len(f"The {k} is {v}.") for k, v in list(COLOURS.items())[-2:])


def lora_config(tmp_path, targets=("query", "value"), **train_kw):
    c = run_config(tmp_path, **train_kw)
    c.lora.rank, c.lora.alpha, c.lora.targets, c.lora.dropout = 4, 8.0, targets, 0.1
    return c


def test_a_lora_run_resumes_exactly(tmp_path):
    """Adapters, their optimizer state and the LoRA dropout masks all continue where they stopped."""
    train(lora_config(tmp_path), tmp_path / "full")
    train(lora_config(tmp_path, stop_after=6), tmp_path / "resumed")
    train(lora_config(tmp_path), tmp_path / "resumed")
    assert_same_run(tmp_path / "full", tmp_path / "resumed")
    no_dropout = lora_config(tmp_path, stop_after=4)  # the same schedule
    no_dropout.lora.dropout = 0.0
    train(no_dropout, tmp_path / "no_dropout")
    assert losses(tmp_path / "no_dropout")[4] != losses(tmp_path / "full")[4]  # the LoRA dropout was on


def test_a_lora_run_from_hugging_face_weights_exports_merged_for_transformers(tmp_path):
    torch, transformers = require_hf()
    model = random_hf_model((torch, transformers), "LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2)
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    c = lora_config(tmp_path, targets=("query", "key", "value", "proj", "mlp", "head"), max_steps=4, save_every=0)
    c.model.name = "tiny-llama-1.1b"
    model_overrides(c, config_from_hf(model.config.to_dict()).to_dict())
    c.model.block_size, c.train.init_from = 32, str(hf_dir)
    train(c, tmp_path / "run")

    config, params, _ = restore_params(tmp_path / "run")
    _, imported = load_hf_checkpoint(hf_dir)
    adapters, base = lora.split(params)
    jax.tree.map(np.testing.assert_array_equal, base, imported)  # the base weights never moved
    assert all(np.abs(b).max() > 0 for b in jax.tree.leaves(adapters))

    out = run_script("convert_hf.py", "export", f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'merged'}")
    assert out.returncode == 0, out.stderr[-3000:]
    tokens = np.random.default_rng(0).integers(0, 65, (2, 16))
    want = np.asarray(GPT(resolve_model_config(config)).apply({"params": params}, tokens))  # adapters unmerged
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = merged(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(got, want[..., : got.shape[-1]], atol=1e-5, rtol=0)

    out = run_script("convert_hf.py", "export", f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'adapters'}",
                     "--adapters_only")
    assert out.returncode == 0, out.stderr[-3000:]
    meta, tensors = load_peft(tmp_path / "adapters")  # PEFT's format, read back into lightjax's adapters
    back = peft_to_adapters(tensors, resolve_model_config(config), "llama")
    jax.tree.map(np.testing.assert_array_equal, back, adapters)  # every target's slots adapted: nothing masked
    assert (meta["r"], meta["lora_alpha"], meta["base_model_name_or_path"]) == (4, 8.0, str(hf_dir.absolute()))


def test_the_finetune_lora_config_trains_at_reduced_size(tmp_path):
    """configs/finetune_lora.py's settings together (LoRA, json: records, the Alpaca template, the
    response mask), on a shrunk random model with the byte tokenizer instead of the downloaded ones."""
    c = load_config("finetune_lora", local_data=False)
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": f"Count to {i}.", "input": "" if i % 2 else "in words",
                                 "output": " ".join(map(str, range(1, i + 1)))} for i in range(1, 41)]))
    c.train.init_from, c.data.tokenizer, c.data.source = "", "byte", f"json:{data}"
    c.data.seq_len, c.data.val_fraction, c.mesh.data = 256, 0.1, -1
    model_overrides(c, dict(n_layer=2, n_embd=64, n_head=4, vocab_size=257, padded_vocab_size=320))
    c.train.max_steps, c.optim.warmup_steps, c.train.eval_every, c.train.global_batch_size = 3, 1, 3, 8
    summary = train(c, tmp_path / "run")
    assert summary["step"] == 3 and np.isfinite(summary["best_val_loss"])
    config, params, _ = restore_params(tmp_path / "run")
    assert resolve_model_config(config).lora_targets == ("query", "value") and lora.split(params)[0]
