"""Tools over a finished run: scripts/evaluate.py, scripts/generate.py (also from a Hugging Face or
an export directory) and scripts/convert_hf.py."""

import json

import numpy as np
import pytest

from lightjax.convert.hf import read_hf_state_dict
from lightjax.data.tokenizers import make_tokenizer
from lightjax.train.evaluate import evaluate_run
from lightjax.train.metrics import read_metrics
from lightjax.train.trainer import train
from tests.helpers import VOCAB, load_config, random_hf_model, require_hf, run_script

pytestmark = pytest.mark.shakespeare  # reads the local Tiny Shakespeare copy


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """A trained smoke run whose last evaluation covers the whole validation split."""
    workdir = tmp_path_factory.mktemp("smoke") / "run"
    config = load_config("smoke")
    config.train.max_steps, config.train.eval_every, config.train.eval_batches = 30, 30, 0
    config.data.data_dir = str(workdir.parent / "tfds")
    config.logging.progress = False
    config.checkpoint.save_every = 0
    train(config, workdir)
    return workdir


def test_evaluate_gives_the_trainers_last_validation_loss(smoke_run):
    last_eval = [r for r in read_metrics(smoke_run) if "val_loss" in r][-1]
    row = evaluate_run(smoke_run)
    assert row["step"] == 30 and row["split"] == "validation"
    assert row["eval_loss"] == pytest.approx(last_eval["val_loss"], rel=1e-5)
    assert row["eval_tokens"] == last_eval["val_tokens"] > 50_000  # the whole split, padding excluded
    assert row["eval_bpc"] == pytest.approx(last_eval["val_bpc"], rel=1e-5)
    assert read_metrics(smoke_run)[-1] == json.loads(json.dumps(row))  # appended to the run's metrics


def test_evaluate_and_generate_scripts(smoke_run):
    out = run_script("evaluate.py", f"--workdir={smoke_run}", "--split=test", "--batches=2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("step 30 | test: loss ") and "bpb" in out.stdout
    out = run_script("generate.py", f"--workdir={smoke_run}", "--prompt=ROMEO:", "--prompt=JULIET:",
                     "--num_samples=2", "--max_new_tokens=20", "--stop=\n\n")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("--- 'ROMEO:'\nROMEO:") == 2 and out.stdout.count("--- 'JULIET:'\nJULIET:") == 2
    assert "tokens/s decoding a batch of 4" in out.stdout
    out = run_script("generate.py", f"--workdir={smoke_run}", "--max_new_tokens=100")
    assert out.returncode == 1
    assert out.stderr.strip() == ("generate: max_new_tokens=100 is not in [1, 63]: the longest prompt has 1 "
                                  "tokens and the model's block_size is 64.")
    out = run_script("evaluate.py", f"--workdir={smoke_run.parent}")
    assert out.returncode == 1 and out.stderr.startswith(f"evaluate: {smoke_run.parent} has no checkpoints/ folder")


def _char_tokenizer_json(directory):
    """A character-level tokenizer.json (BPE without merges) over the random models' VOCAB ids."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {chr(32 + i): i for i in range(VOCAB)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.decoder = decoders.Fuse()  # join the pieces without spaces
    tokenizer.save(str(directory / "tokenizer.json"))
    return vocab


def _greedy_text(torch, model, prompt_ids, n):
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                              eos_token_id=None)[0, len(prompt_ids):].tolist()
    return "".join(chr(32 + i) for i in want)


def test_generate_from_a_hugging_face_directory(tmp_path):
    torch, transformers = require_hf()
    model = random_hf_model((torch, transformers), "LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2)
    model.save_pretrained(tmp_path)
    vocab = _char_tokenizer_json(tmp_path)
    out = run_script("generate.py", f"--hf_dir={tmp_path}", "--prompt=Hello", "--temperature=0",
                     "--max_new_tokens=12")
    assert out.returncode == 0, out.stderr[-3000:]
    text = _greedy_text(torch, model, [vocab[c] for c in "Hello"], 12)
    assert f"--- 'Hello'\nHello{text}\n" in out.stdout


def test_convert_hf_import_generate_export(tmp_path):
    """HF directory -> lightjax export directory (generate and the data pipeline use its tokenizer)
    -> HF directory again, every tensor bit-equal."""
    torch, transformers = require_hf()
    model = random_hf_model((torch, transformers), "Qwen3Config", "Qwen3ForCausalLM", num_key_value_heads=2,
                            head_dim=16)
    hf_dir, lj_dir, back_dir = tmp_path / "hf", tmp_path / "lightjax", tmp_path / "back"
    model.save_pretrained(hf_dir)
    vocab = _char_tokenizer_json(hf_dir)
    out = run_script("convert_hf.py", "import", f"--hf_dir={hf_dir}", f"--out={lj_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == f"Imported qwen3 (2 layers, float32) into {lj_dir}, with its tokenizer."

    out = run_script("generate.py", f"--export_dir={lj_dir}", "--prompt=Hello", "--temperature=0",
                     "--max_new_tokens=12")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"--- 'Hello'\nHello{_greedy_text(torch, model, [vocab[c] for c in 'Hello'], 12)}\n" in out.stdout
    tokenizer = make_tokenizer(f"hf:{hf_dir}")  # config.data.tokenizer="hf:DIR" in a run
    assert tokenizer.encode("Hello").tolist() == [vocab[c] for c in "Hello"] and tokenizer.vocab_size == VOCAB

    out = run_script("convert_hf.py", "export", f"--export_dir={lj_dir}", f"--out={back_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("as HF qwen3 (float32) to " f"{back_dir}; tokenizer.json written.")
    original, back = read_hf_state_dict(hf_dir), read_hf_state_dict(back_dir)
    assert sorted(back) == sorted(original)
    assert all(np.array_equal(back[k], original[k]) and back[k].dtype == original[k].dtype for k in original)
    assert (back_dir / "tokenizer.json").read_text() == (hf_dir / "tokenizer.json").read_text()

    out = run_script("convert_hf.py", "import", f"--hf_dir={tmp_path / 'nope'}", f"--out={tmp_path / 'x'}")
    assert out.returncode == 1
    assert out.stderr.strip() == (f"convert_hf: No config.json in {tmp_path / 'nope'}: "
                                  "not a Hugging Face model directory.")


def test_convert_hf_export_of_a_training_run(smoke_run, tmp_path):
    """A lightjax run's checkpoint -> an HF directory that transformers loads with the same logits."""
    torch, transformers = require_hf()
    from lightjax.model.gpt import GPT
    from lightjax.train.checkpoint import restore_params
    from lightjax.train.config import resolve_model_config

    out = run_script("convert_hf.py", "export", f"--workdir={smoke_run}", f"--out={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "as HF gpt_neox (float32)" in out.stdout and "'char' tokenizer has no Hugging Face file" in out.stdout
    config, params, _ = restore_params(smoke_run)
    tokens = np.random.default_rng(0).integers(0, 65, (2, 16))
    want = np.asarray(GPT(resolve_model_config(config)).apply({"params": params}, tokens))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        got = model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_export_script_and_a_bfloat16_hugging_face_export(smoke_run, tmp_path):
    """scripts/export.py --dtype bfloat16 and convert_hf.py export --dtype bfloat16: the run's parameters
    cast to bfloat16, in an export directory and in bfloat16 safetensors."""
    import jax
    import ml_dtypes

    from lightjax.convert.export import load_exported
    from lightjax.convert.hf import params_to_hf
    from lightjax.train.checkpoint import restore_params
    from lightjax.train.config import resolve_model_config

    config, params, _ = restore_params(smoke_run)
    bf16 = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16), params)
    out = run_script("export.py", f"--workdir={smoke_run}", f"--out={tmp_path / 'export'}", "--dtype=bfloat16")
    assert out.returncode == 0, out.stderr[-3000:]
    _, exported = load_exported(tmp_path / "export")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), exported, bf16)
    assert (tmp_path / "export" / "tokenizer" / "tokenizer.json").exists()
    out = run_script("convert_hf.py", "export", f"--workdir={smoke_run}", f"--out={tmp_path / 'hf'}",
                     "--dtype=bfloat16")
    assert out.returncode == 0, out.stderr[-3000:]
    written, want = read_hf_state_dict(tmp_path / "hf"), params_to_hf(bf16, resolve_model_config(config))
    assert sorted(written) == sorted(want)
    assert all(written[k].dtype == ml_dtypes.bfloat16 and np.array_equal(written[k], want[k]) for k in want)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
