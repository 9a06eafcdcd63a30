"""Preference tuning's pieces (data/preferences.py, train/preference.py): pairs read in TRL's three forms
and laid out as rows, and the DPO and IPO objectives with TRL's metrics, equal to TRL's DPOTrainer on a
tiny random model and a fixed batch of pairs."""

import json

import numpy as np
import pytest

from lightjax.data.preferences import PairRows, as_pair, write_pairs
from lightjax.data.prompts import PromptStyle
from lightjax.data.records import Record
from lightjax.data.tokenizers import ByteTokenizer
from lightjax.train.preference import pair_losses, pair_sums, response_logps
from tests.helpers import random_hf_model, require_hf


def _record(where="pairs.jsonl:1", **fields):
    r = Record(fields)
    r.where = where
    return r


MESSAGES = [{"role": "user", "content": "Name a prime."}]
FORMS = {
    "strings": _record(prompt="Name a prime.", chosen="7", rejected="8"),
    "conversations": _record(chosen=MESSAGES + [{"role": "assistant", "content": "7"}],
                             rejected=MESSAGES + [{"role": "assistant", "content": "8"}]),
    "prompt apart": _record(prompt=MESSAGES, chosen=[{"role": "assistant", "content": "7"}],
                            rejected=[{"role": "assistant", "content": "8"}]),
}


@pytest.mark.parametrize("form", FORMS)
def test_each_form_is_one_prompt_and_two_responses(tmp_path, form):
    style = PromptStyle("alpaca")
    chosen, rejected = (style(side) for side in as_pair(FORMS[form]))
    assert chosen[0] == rejected[0] and "Name a prime." in chosen[0] and (chosen[1], rejected[1]) == ("7", "8")
    meta = write_pairs([FORMS[form]] * 3, style, ByteTokenizer(), tmp_path / "train.pairs.npz")
    rows = PairRows.load(tmp_path / "train.pairs.npz", seq_len=511)
    assert meta["pairs"] == len(rows) == 3 and rows.note == ""
    row = rows[1]
    tokens, seg = row["tokens"], row["segment_ids"]
    # The chosen side is segment 1, the rejected side segment 2; each mask marks its response and EOS.
    assert bytes(tokens[1:][row["chosen_mask"] == 1][:-1].astype(np.uint8)) == b"7"
    assert bytes(tokens[1:][row["rejected_mask"] == 1][:-1].astype(np.uint8)) == b"8"
    assert set(seg[row["chosen_mask"] == 1]) == {1} and set(seg[row["rejected_mask"] == 1]) == {2}
    assert row["positions"][seg == 2][0] == 0  # the rejected side starts its own positions


def test_bad_pairs_are_named_and_long_ones_counted(tmp_path):
    with pytest.raises(ValueError, match=r"pairs.jsonl:4: 'chosen' and 'rejected' differ before their last"):
        as_pair(_record("pairs.jsonl:4", chosen=MESSAGES + [{"role": "assistant", "content": "7"}],
                        rejected=[{"role": "user", "content": "Other."}, {"role": "assistant", "content": "8"}]))
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: string 'chosen' and 'rejected' need a string 'prompt'"):
        as_pair(_record("pairs.jsonl:2", chosen="7", rejected="8"))
    with pytest.raises(ValueError, match=r"pairs.jsonl:3: a preference record needs 'chosen' and 'rejected'"):
        as_pair(_record("pairs.jsonl:3", prompt="p", chosen="7"))
    long = _record(prompt="p", chosen="x" * 400, rejected="y")
    write_pairs([long, FORMS["strings"]], PromptStyle("alpaca"), ByteTokenizer(), tmp_path / "p.pairs.npz")
    rows = PairRows.load(tmp_path / "p.pairs.npz", seq_len=511)
    assert rows.cut == 1 and "1 of 2 pairs have a side longer than half a row (256 tokens" in rows.note
    assert rows[0]["chosen_mask"].sum() > 0 and (rows[0]["segment_ids"] == 1).sum() == 256


def _trl_batch_metrics(tmp_path, pairs, loss_type):
    """TRL's DPOTrainer's loss and logged metrics on `pairs` (token ids) with the saved policy and reference."""
    torch, transformers = require_hf()
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    load = transformers.AutoModelForCausalLM.from_pretrained
    policy, reference = (load(tmp_path / name, attn_implementation="eager").eval() for name in ("policy", "reference"))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "<unk>")),
                                                     pad_token="<pad>", eos_token="</s>")
    # bf16=False: TRL's configs default to bfloat16 autocast, which its reference forward then runs under.
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, loss_type=[loss_type], report_to=[], use_cpu=True,
                     bf16=False, per_device_train_batch_size=len(pairs))
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 4))
    with torch.no_grad():
        loss = float(trainer.compute_loss(trainer.model, DataCollatorForPreference(pad_token_id=0)(pairs)))
    return loss, {k: v[-1] for k, v in trainer._metrics["eval"].items() if k.startswith(("rewards/", "logps/"))}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_equal_trl(tmp_path, loss_type):
    torch, _ = hf = require_hf()
    from lightjax.convert.hf import load_hf_checkpoint
    from lightjax.model.gpt import GPT

    random_hf_model(hf, "LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2).save_pretrained(tmp_path / "policy")
    reference = random_hf_model(hf, "LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2)
    with torch.no_grad():  # the reference a step away from the policy, as after some training
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference.save_pretrained(tmp_path / "reference")
    rng = np.random.default_rng(0)
    pairs = [{"prompt_ids": rng.integers(3, 100, 5 + i).tolist(),
              "chosen_ids": rng.integers(3, 100, 3 + i % 3).tolist(),
              "rejected_ids": rng.integers(3, 100, 2 + (2 * i) % 5).tolist()} for i in range(4)]
    trl_loss, trl_metrics = _trl_batch_metrics(tmp_path, pairs, loss_type)

    ids, starts, prompt_lens = [], [0], []
    for p in pairs:
        for side in ("chosen_ids", "rejected_ids"):
            ids += p["prompt_ids"] + p[side]
            starts.append(len(ids))
            prompt_lens.append(len(p["prompt_ids"]))
    rows = PairRows(np.array(ids), np.array(starts), np.array(prompt_lens), seq_len=40)
    batch = {k: np.stack([rows[i][k] for i in range(len(rows))]) for k in rows[0]}
    cfg, policy = load_hf_checkpoint(tmp_path / "policy")
    _, ref = load_hf_checkpoint(tmp_path / "reference")
    model = GPT(cfg)
    ours, theirs = response_logps(model, policy, batch), response_logps(model, ref, batch)
    lengths = (batch["chosen_mask"].sum(-1).astype(np.float32), batch["rejected_mask"].sum(-1).astype(np.float32))
    loss = float(pair_losses(ours, theirs, lengths, 0.1, loss_type).mean())
    assert loss == pytest.approx(trl_loss, abs=1e-5)
    sums = pair_sums(ours, theirs, 0.1, np.ones(len(pairs), np.float32))
    assert set(sums) == set(trl_metrics)
    for key, value in trl_metrics.items():
        assert float(sums[key]) / len(pairs) == pytest.approx(value, abs=1e-5), key


def test_label_smoothing_is_conservative_dpo():
    policy = (np.array([-3.0, -5.0]), np.array([-4.0, -2.0]))
    reference = (np.array([-3.5, -4.0]), np.array([-4.0, -2.5]))
    lengths = (np.array([2.0, 3.0]), np.array([2.0, 1.0]))
    d = 0.5 * ((policy[0] - reference[0]) - (policy[1] - reference[1]))
    expected = -(0.9 * np.log(1 / (1 + np.exp(-d))) + 0.1 * np.log(1 / (1 + np.exp(d))))
    np.testing.assert_allclose(pair_losses(policy, reference, lengths, 0.5, "sigmoid", 0.1), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="config.preference.loss='hinge' is not one of sigmoid, ipo"):
        pair_losses(policy, reference, lengths, 0.5, "hinge")


def test_a_preference_file_round_trips(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(dict(r)) + "\n" for r in FORMS.values()))
    from lightjax.data.records import load_records

    records = load_records(f"jsonl:{path}", "train", 0.34)
    assert [as_pair(r)[0]["messages"][-1]["content"] if "messages" in as_pair(r)[0] else as_pair(r)[0]["output"]
            for r in records] == ["7", "7"]


def _pair_batch(seed=0, pairs=4, seq_len=32, vocab=96):
    rng = np.random.default_rng(seed)
    ids, starts, prompt_lens = [], [0], []
    for i in range(pairs):
        prompt = rng.integers(3, vocab, 4 + i % 3).tolist()
        for n in (3 + i % 4, 2 + (3 * i) % 5):
            ids += prompt + rng.integers(3, vocab, n).tolist()
            starts.append(len(ids))
            prompt_lens.append(len(prompt))
    rows = PairRows(np.array(ids), np.array(starts), np.array(prompt_lens), seq_len=seq_len)
    return {k: np.stack([rows[i][k] for i in range(len(rows))]) for k in rows[0]}


def _preference_run(lora_rank):
    import jax

    from lightjax.runtime.sharding import shard_batch
    from lightjax.train.optim import lr_schedule, make_optimizer
    from lightjax.train.preference import make_preference_step
    from lightjax.train.run import build_run
    from tests.helpers import tiny_run_config

    c = tiny_run_config("llama")
    c.data.seq_len, c.train.global_batch_size, c.lora.rank, c.optim.lr = 32, 4, lora_rank, 1e-2
    run = build_run(c, jax.devices()[:1])
    state = run.init_state()
    step = make_preference_step(run.model, make_optimizer(c.optim, 10), lr_schedule(c.optim, 10), run.shardings,
                                shard_batch(_pair_batch(), run.mesh)["tokens"].sharding, SETTINGS)
    return run, state, step, shard_batch(_pair_batch(), run.mesh)


SETTINGS = {"beta": 0.1, "loss": "sigmoid", "label_smoothing": 0.0}


def test_full_tuning_keeps_its_reference_frozen():
    """Each step's rewards are the policy's log-ratios against the initial parameters: after three updates
    they are what preference_sums computes against the initial ones (and not zero, as they would be
    against the moving policy)."""
    import jax

    from lightjax.train.preference import preference_sums

    run, state, step, batch = _preference_run(0)
    initial = jax.tree.map(lambda x: x.copy(), state.params)
    for _ in range(3):
        state, metrics = step(state, batch, initial)
    before = jax.tree.map(lambda x: x.copy(), state.params)
    state, metrics = step(state, batch, initial)
    _, sums = preference_sums(run.model, before, initial, batch, SETTINGS)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "loss"):
        assert float(metrics[key]) == pytest.approx(float(sums[key]) / float(sums["pairs"]), abs=1e-6), key
    assert abs(float(metrics["rewards/margins"])) > 1e-3 and float(metrics["rewards/accuracies"]) > 0.5


def test_lora_reference_is_the_base_with_the_adapters_off():
    """The reference of a LoRA run computes the base model bit for bit, and the base weights never move."""
    import jax

    from lightjax.model import lora
    from lightjax.model.gpt import GPT
    from lightjax.train.preference import adapters_off, response_logps

    run, state, step, batch = _preference_run(4)
    base = jax.tree.map(lambda x: np.asarray(x).copy(), lora.split(state.params)[1])
    for _ in range(3):
        state, metrics = step(state, batch)
    adapters, now = lora.split(state.params)
    assert any(np.abs(np.asarray(a)).max() > 0 for a in jax.tree.leaves(adapters))  # the adapters learned
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, now), base)
    plain_cfg, _ = lora.merge(run.model.config, state.params)
    off = response_logps(run.model, adapters_off(state.params), batch)
    plain = response_logps(GPT(plain_cfg), base, batch)
    for a, b in zip(off, plain, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(metrics["rewards/accuracies"]) > 0.5


def _parity_pairs(path, n, seed):
    rng = np.random.default_rng(seed)
    numbers = rng.integers(10, 100, n)
    rows = [{"prompt": f"Is {x} even or odd?", "chosen": "even" if x % 2 == 0 else "odd",
             "rejected": "odd" if x % 2 == 0 else "even"} for x in numbers]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _toy_config(tmp_path, max_steps, eval_every):
    """A tiny byte-level model's full DPO from its initial weights on pairs "Is N even or odd?"."""
    from lightjax.train.config import default_config
    from tests.helpers import TINY_FAMILIES, model_overrides

    c = default_config()
    model_overrides(c, {**TINY_FAMILIES["pythia"], "vocab_size": 257, "block_size": 512})
    c.model.name = "pythia-14m"
    c.data.source = f"jsonl:{_parity_pairs(tmp_path / 'p.jsonl', 600, 0)}"
    c.data.tokenizer, c.data.seq_len = "byte", 384
    c.data.val_fraction = 0.1
    c.optim.lr, c.optim.warmup_steps, c.optim.schedule, c.optim.weight_decay = 3e-3, 5, "constant", 0.0
    c.train.global_batch_size, c.train.max_steps, c.train.eval_every = 16, max_steps, eval_every
    c.train.eval_batches = 0
    c.train.log_every, c.checkpoint.save_every, c.logging.tensorboard = 10, 0, False
    return c


def test_a_toy_run_learns_the_rule_on_held_out_pairs(tmp_path):
    """A tiny byte-level model, DPO of every weight from its initial ones, on pairs whose chosen answer is
    the number's parity: the held-out pairs' reward accuracy rises above 90%."""
    from lightjax.train.metrics import read_metrics
    from lightjax.train.trainer import train

    c = _toy_config(tmp_path, 120, 40)
    train(c, tmp_path / "run")
    rows = read_metrics(tmp_path / "run")
    evals = [r for r in rows if "val_rewards/accuracies" in r]
    assert [r["step"] for r in evals] == [40, 80, 120]
    print("held-out reward accuracy by step:", [(r["step"], round(r["val_rewards/accuracies"], 3)) for r in evals])
    assert evals[-1]["val_rewards/accuracies"] > 0.9, evals
    assert "rewards/margins" in rows[-2] or any("rewards/margins" in r for r in rows)


def _dpo_steps(source, mesh, lora_rank, n_steps=3):
    """Losses, TRL's metrics and final parameters of `n_steps` DPO steps of a tiny Llama on a mesh."""
    import jax

    from lightjax.runtime.sharding import shard_batch
    from lightjax.train.run import build_run
    from tests.helpers import tiny_run_config

    c = tiny_run_config("llama", mesh)
    c.data.source, c.data.seq_len, c.lora.rank, c.lora.dropout, c.optim.lr = source, 32, lora_rank, 0.0, 1e-2
    run = build_run(c, jax.devices()[: int(np.prod(mesh))])
    state = run.init_state()
    if run.needs_reference:
        run = run.with_reference(jax.tree.map(lambda x: x.copy(), state.params))
    seen = []
    for seed in range(n_steps):
        state, metrics = run.train_step(state, shard_batch(_pair_batch(seed, pairs=8), run.mesh))
        seen.append([float(metrics[k]) for k in ("loss", "rewards/chosen", "rewards/margins", "logps/rejected")])
    return np.array(seen), jax.device_get(state.params)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_dpo_on_sharded_meshes_equals_one_device(tmp_path, lora_rank):
    """DPO's steps on meshes (1,8,1) and (2,2,2) of 8 simulated devices: the loss, rewards, log-likelihoods
    and parameters of one device's, within 1e-5 (full tuning, its reference sharded as the parameters; LoRA)."""
    from tests.test_sharding import assert_params_close

    source = f"jsonl:{_parity_pairs(tmp_path / 'p.jsonl', 4, 0)}"
    want, want_params = _dpo_steps(source, (1, 1, 1), lora_rank)
    assert np.abs(want[-1, 2]) > 1e-4  # the policy moved away from its reference
    for mesh in [(1, 8, 1), (2, 2, 2)]:
        seen, params = _dpo_steps(source, mesh, lora_rank)
        np.testing.assert_allclose(seen, want, atol=1e-5, rtol=0, err_msg=str(mesh))
        assert_params_close(params, want_params)


def test_a_killed_dpo_run_resumes_exactly(tmp_path):
    """Full DPO stopped after 3 of 6 steps and resumed: its reference (the initial weights, recomputed from
    the seed on resume) is the same, so every metrics row (rewards included) and the final parameters equal
    the uninterrupted run's. (scripts/fault_injection.py kills such runs with SIGKILL; see the README.)"""
    import jax

    from lightjax.checks.fault_injection import rows_of
    from lightjax.train.trainer import train
    from tests.runs import final_params

    def config(**train_kw):
        c = _toy_config(tmp_path, 6, 3)
        c.train.log_every, c.checkpoint.save_every, c.train.global_batch_size = 1, 3, 8
        for k, v in train_kw.items():
            setattr(c.train, k, v)
        return c

    train(config(), tmp_path / "full")
    train(config(stop_after=3), tmp_path / "resumed")
    train(config(), tmp_path / "resumed")
    rows = rows_of(tmp_path / "full")
    assert rows_of(tmp_path / "resumed") == rows and any("val_rewards/margins" in r for r in rows)
    assert abs([r for r in rows if "rewards/margins" in r][-1]["rewards/margins"]) > 0
    jax.tree.map(np.testing.assert_array_equal, final_params(tmp_path / "full")["params"],
                 final_params(tmp_path / "resumed")["params"])


def test_preference_settings_are_checked_at_start_up(tmp_path):
    from lightjax.train.config import ConfigError
    from lightjax.train.validate import validate
    from tests.helpers import tiny_run_config

    c = tiny_run_config()
    c.data.source = f"jsonl:{_parity_pairs(tmp_path / 'p.jsonl', 4, 0)}"
    c.preference.beta, c.preference.loss, c.preference.label_smoothing = 0.0, "hinge", 0.5
    c.data.pack, c.data.document_mask = True, False
    with pytest.raises(ConfigError) as e:
        validate(c, 1)
    for key in ("preference.beta=0.0 must be > 0", "preference.loss='hinge' is not one of sigmoid, ipo",
                "preference.label_smoothing=0.5 must be in [0, 0.5)", "data.pack=True must be False for preference",
                "data.document_mask=False must be True for preference"):
        assert f"config.{key}" in str(e.value), str(e.value)


def test_the_dpo_lora_config_trains_and_its_merged_export_loads_in_transformers(tmp_path):
    """configs/dpo_lora.py's settings (LoRA DPO, a folder of train/validation jsonl in TRL's conversational
    form, the model's chat template) on a tiny random Qwen 3 saved by transformers: the base weights never
    move, the validation pairs' rewards are logged, and the merged export computes in transformers what the
    run's LoRA model computes."""
    torch, transformers = require_hf()
    import jax

    from lightjax.convert.export import load_weights
    from lightjax.model import lora
    from lightjax.train.checkpoint import restore_params
    from lightjax.train.config import resolve_model_config
    from lightjax.train.export import export_hf
    from lightjax.train.metrics import plot_panels, read_metrics
    from lightjax.train.run import build_model
    from lightjax.train.trainer import train
    from tests.helpers import load_config
    from tests.test_exports import SUBJECTS, _hf_base

    base = _hf_base(tmp_path / "base", "qwen3")
    data = tmp_path / "ultrafeedback"
    data.mkdir()
    for split, subjects in (("train", SUBJECTS), ("validation", SUBJECTS[:2])):
        pairs = [{"chosen": [{"role": "user", "content": f"is it a {a} ?"}, {"role": "assistant", "content": "yes"}],
                  "rejected": [{"role": "user", "content": f"is it a {a} ?"},
                               {"role": "assistant", "content": "the big dog"}], "score_chosen": 8.0}
                 for a in subjects]
        (data / f"{split}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    c = load_config("dpo_lora", local_data=False)
    c.model.name, c.train.init_from, c.data.tokenizer = f"hf:{base}", str(base), f"hf:{base}"
    c.data.source, c.data.seq_len = f"jsonl:{data}", 32
    c.lora.targets = ("query", "key", "value", "proj", "mlp", "head")  # every exported kind of tensor moves
    c.optim.lr, c.optim.warmup_steps, c.train.global_batch_size, c.mesh.data = 1e-2, 1, 8, -1
    c.train.max_steps, c.train.eval_every, c.checkpoint.save_every, c.logging.tensorboard = 3, 3, 0, False
    train(c, tmp_path / "run")

    rows = read_metrics(tmp_path / "run")
    assert plot_panels(rows) == ["loss", "rewards"] and (tmp_path / "run" / "loss.png").is_file()
    assert rows[-1]["step"] == 3 and rows[-1]["val_rewards/margins"] != 0 and rows[-1]["val_rewards/accuracies"] >= 0
    config, params, _ = restore_params(tmp_path / "run")
    adapters, frozen = lora.split(params)
    jax.tree.map(np.testing.assert_array_equal, frozen, load_weights(base)[1])  # the base weights never moved
    export_hf(tmp_path / "merged", workdir=tmp_path / "run")
    tokens = np.array([[1, 4, 12, 10, 16, 5, 7]])
    want = np.asarray(build_model(resolve_model_config(config), config.train).apply({"params": params}, tokens))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = merged(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(got, want[..., : got.shape[-1]], atol=1e-5, rtol=0)
    assert np.abs(got - np.asarray(transformers.AutoModelForCausalLM.from_pretrained(base).eval()(
        torch.tensor(tokens)).logits.detach())).max() > 1e-3  # the export is not the base
