"""Exports that Hugging Face tools take as the original. A tiny random model of each family, saved by
transformers with its own tokenizer files and chat template, is LoRA-tuned (`model.name=hf:DIR`, no size
given) to answer "yes indeed" and stop; its merged export then loads with `AutoTokenizer` and
`AutoModelForCausalLM` alone and behaves as the base and the lightjax model do; its adapters load into PEFT."""

import json

import jax
import numpy as np
import pytest

from lightjax.convert.export import load_weights
from lightjax.convert.peft import load_peft, peft_to_adapters, read_adapters, save_peft
from lightjax.data.examples import prompt_ids
from lightjax.data.prompts import PromptStyle
from lightjax.data.records import Record
from lightjax.data.tokenizers import load_tokenizer
from lightjax.model import lora
from lightjax.model.generate import generate
from lightjax.train.checkpoint import restore_params
from lightjax.train.config import default_config, resolve_model_config
from lightjax.train.export import export_adapters, export_hf, import_hf
from lightjax.train.run import build_model, build_run
from lightjax.train.trainer import train
from tests.helpers import random_hf_model, require_hf

FAMILIES = {  # transformers' config and model classes, and what sets each family apart at this size
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 2}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"num_key_value_heads": 2, "head_dim": 8}),
}
SPECIAL = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<|user|>": 4, "<|assistant|>": 5, "<|system|>": 6}
WORDS = ["yes", "indeed", "is", "it", "a", "the", "cat", "dog", "sun", "moon", "tree", "red", "blue", "big", "?",
         "answer", "briefly", "."]
TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' ' }}{% if m['role'] == "
            "'assistant' %}{{ eos_token + ' ' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
            "{{ '<|assistant|> ' }}{% endif %}")
SUBJECTS = ["cat", "dog", "sun", "moon", "tree", "red", "blue", "big"]
RECORDS = [{"messages": [{"role": "system", "content": "answer briefly ."},
                         {"role": "user", "content": f"is it a {a} {b} ?"},
                         {"role": "assistant", "content": "yes indeed"}]} for a in SUBJECTS for b in SUBJECTS[:2]]


def _hf_base(folder, family):
    """A random model saved by transformers (bos 1, eos 2, pad 0), with a word-level tokenizer.json,
    tokenizer_config.json (special tokens, chat template) written beside it."""
    torch, transformers = hf = require_hf()
    from tokenizers import Tokenizer, models, pre_tokenizers

    config_cls, model_cls, extra = FAMILIES[family]
    model = random_hf_model(hf, config_cls, model_cls, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    model.save_pretrained(folder)
    vocab = {**SPECIAL, **{w: len(SPECIAL) + i for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIAL))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "unk_token": "<unk>", "chat_template": TEMPLATE}))
    return folder


def _lora_run(tmp_path, base, init_from, targets=("query", "key", "value", "proj", "mlp", "head")):
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    c = default_config()
    c.model.name, c.train.init_from = f"hf:{init_from}", str(init_from)  # no size given: read from the folder
    c.data.source, c.data.tokenizer, c.data.prompt_style = f"jsonl:{records}", f"hf:{base}", "chat"
    c.data.seq_len, c.data.val_fraction = 24, 0.125
    c.lora.rank, c.lora.alpha, c.lora.dropout, c.lora.targets = 8, 16.0, 0.0, targets
    c.optim.lr, c.optim.schedule, c.optim.warmup_steps, c.optim.weight_decay = 1e-2, "constant", 1, 0.0
    c.train.global_batch_size, c.train.max_steps, c.train.eval_every, c.train.log_every = 8, 60, 0, 20
    c.checkpoint.save_every = 0
    c.logging.tensorboard = False
    train(c, tmp_path / "run")
    return tmp_path / "run"


def _hf_greedy(transformers, folder, ids, max_new):
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("family,via", [("gpt_neox", "hf"), ("llama", "hf"), ("qwen3", "hf"), ("llama", "export")])
def test_a_merged_lora_export_is_the_base_folder_with_new_weights(tmp_path, family, via):
    _, transformers = require_hf()
    base = _hf_base(tmp_path / "base", family)
    init_from = base
    if via == "export":  # the run starts from a lightjax import of the folder, not from the folder
        import_hf(base, tmp_path / "imported")
        init_from = tmp_path / "imported"
    run = _lora_run(tmp_path, base, init_from)
    export_hf(tmp_path / "merged", workdir=run)

    tok, base_tok = (transformers.AutoTokenizer.from_pretrained(d) for d in (tmp_path / "merged", base))
    ids = lambda t: (t.bos_token_id, t.eos_token_id, t.pad_token_id)  # noqa: E731
    assert ids(tok) == ids(base_tok) == (1, 2, 0)
    written = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"]) == (1, 2, 0)
    assert json.loads((tmp_path / "merged" / "generation_config.json").read_text())["eos_token_id"] == 2
    record = RECORDS[0]["messages"]
    assert tok.apply_chat_template(record, tokenize=False) == base_tok.apply_chat_template(record, tokenize=False)

    # Greedy answers, lightjax's from the run and transformers' from the export folder alone, stop at the
    # same EOS after "yes indeed".
    config, params, _ = restore_params(run)
    cfg, tokenizer = resolve_model_config(config), load_tokenizer(run / "tokenizer")
    model = build_model(cfg, config.train)
    prompt = PromptStyle("chat", f"hf:{base}")(Record(messages=record))[0]
    prompt_tokens = prompt_ids(prompt, tokenizer).tolist()
    assert tok(prompt, add_special_tokens=False).input_ids == tokenizer.encode(prompt).tolist()
    (ours,) = generate(model, params, [prompt_tokens], 8, eos_id=tokenizer.eos_id)
    theirs = _hf_greedy(transformers, tmp_path / "merged", prompt_tokens, 8)
    assert tokenizer.decode(ours) == "yes indeed"  # cut before EOS
    assert theirs == ours + [2]  # the same tokens, then EOS, where transformers stops


def test_peft_adapters_compute_the_lora_model_and_read_back(tmp_path):
    """A run's adapters (every target) through PEFT equal lightjax's unmerged LoRA model, and a run
    started from them (train.init_from=ADAPTERS) starts with them."""
    torch, transformers = require_hf()
    import peft

    base = _hf_base(tmp_path / "base", "llama")
    run = _lora_run(tmp_path, base, base)
    out = export_adapters(run, tmp_path / "adapters")
    config, params, _ = restore_params(run)
    cfg = resolve_model_config(config)
    tokens = np.array([[1, 4, 12, 10, 16, 5]])
    want = np.asarray(build_model(cfg, config.train).apply({"params": params}, tokens))
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(hf_base, out).eval()(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(got, want[..., :got.shape[-1]], atol=1e-5, rtol=0)

    # Read back: a run from the adapters (train.init_from=ADAPTERS) starts with exactly the adapters written.
    config.train.init_from = str(out)
    again = build_run(config)
    _, base_params = load_weights(out)
    state = again.init_state(base_params, read_adapters(out, cfg))
    jax.tree.map(np.testing.assert_array_equal, lora.split(state.params)[0], lora.split(params)[0])


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize("targets", [("query", "value"), ("query", "key", "value", "proj", "mlp", "head")])
def test_peft_layout_of_each_family(tmp_path, family, targets):
    """Random adapters (B non-zero) in PEFT's layout: PEFT's model equals lightjax's to 1e-5; a q/v run
    writes only q/v modules; reading back gives the same adapters (the masked key slots as zeros)."""
    torch, transformers = require_hf()
    import flax.linen as nn
    import peft

    from lightjax.convert.hf import load_hf_checkpoint
    from lightjax.model.gpt import GPT

    base = _hf_base(tmp_path / "base", family)
    cfg, params = load_hf_checkpoint(base)
    cfg = cfg.replace(lora_r=4, lora_alpha=8.0, lora_targets=targets)
    fresh = lora.split(nn.unbox(GPT(cfg).init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]))[0]
    rng = np.random.default_rng(0)
    adapters = jax.tree.map(lambda x: (0.05 * rng.normal(size=x.shape)).astype(np.float32), fresh)
    save_peft(tmp_path / "adapters", adapters, cfg, family, str(base))
    written, tensors = load_peft(tmp_path / "adapters")
    if targets == ("query", "value"):
        modules = {m.rsplit(".", 1)[-1] for m in written["target_modules"]}
        assert modules == ({"q_proj", "v_proj"} if family == "llama" else {"query_key_value"})
    tokens = np.array([[1, 4, 12, 10, 16, 5, 9]])
    want = np.asarray(GPT(cfg).apply({"params": lora.combine(adapters, params)}, tokens))
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapters").eval()(torch.tensor(tokens)).logits
    np.testing.assert_allclose(got.numpy(), want[..., :got.shape[-1]], atol=1e-5, rtol=0)
    back = peft_to_adapters(tensors, cfg, family)
    qkv = lora.qkv_lora(cfg)
    adapters = jax.tree_util.tree_map_with_path(
        lambda path, x: np.asarray(qkv.mask(x)) if "qkv" in str(path) and "lora_b" in str(path) else x, adapters)
    jax.tree.map(np.testing.assert_array_equal, back, adapters)
