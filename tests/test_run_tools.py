"""Tools over a finished run: scripts/evaluate.py and scripts/generate.py (also from a Hugging Face
directory)."""

import json

import pytest

from lightjax.evaluate import evaluate_run
from lightjax.metrics import read_metrics
from lightjax.trainer import train
from tests.conftest import require_hf
from tests.helpers import VOCAB, load_config, random_hf_model, run_script


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
    assert out.returncode == 1 and out.stderr.startswith("evaluate: No complete checkpoint under")


def test_generate_from_a_hugging_face_directory(tmp_path):
    torch, transformers = require_hf()
    from tokenizers import Tokenizer, decoders, models

    model = random_hf_model((torch, transformers), "LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2)
    model.save_pretrained(tmp_path)
    vocab = {chr(32 + i): i for i in range(VOCAB)}  # a character-level BPE without merges
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.decoder = decoders.Fuse()  # join the pieces without spaces
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    out = run_script("generate.py", f"--hf_dir={tmp_path}", "--prompt=Hello", "--temperature=0",
                     "--max_new_tokens=12")
    assert out.returncode == 0, out.stderr[-3000:]
    prompt = [vocab[c] for c in "Hello"]
    with torch.no_grad():
        want = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                              eos_token_id=None)[0, 5:].tolist()
    text = "".join(chr(32 + i) for i in want)
    assert f"--- 'Hello'\nHello{text}\n" in out.stdout
