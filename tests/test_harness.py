"""lm-evaluation-harness tasks on lightjax models (lightjax/train/harness.py, tasks.py): every request the
harness makes is answered as its `hf` backend answers it for the same model in transformers, offline,
on four local tasks (tests/harness_tasks.py); the same through scripts/evaluate.py --tasks on a run and a
LoRA run (against their Hugging Face exports), and at a run's evaluation steps."""

import json

import jax
import numpy as np
import pytest

from lightjax.train.config import default_config
from lightjax.train.export import export_hf
from lightjax.train.harness import HarnessModel
from lightjax.train.load import load_model
from lightjax.train.metrics import read_metrics
from lightjax.train.tasks import run_tasks, task_manager, task_metrics
from lightjax.train.trainer import train
from tests.harness_tasks import TASK_NAMES, corpus, write_hf_model, write_tasks
from tests.helpers import require_hf, run_script

ROLLING_RTOL = 1e-6  # a whole text's sum of float32 log-probabilities (~1e3 nats, resolved to ~1e-4)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    folder = write_tasks(tmp_path_factory.mktemp("tasks"))
    return folder, task_manager(TASK_NAMES, str(folder))


def _hf_backend(folder):
    require_hf()
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=4)


def _by_doc(results, task):
    return sorted(results["samples"][task], key=lambda s: s["doc_id"])


def assert_same_answers(ours, theirs, tasks=TASK_NAMES):
    """Every request's answer (log-likelihood within 1e-4 and is-greedy flag; rolling sums within
    ROLLING_RTOL; generated text) and every task's metrics, equal."""
    for task in tasks:
        for mine, hf in zip(_by_doc(ours, task), _by_doc(theirs, task), strict=True):
            for a, b in zip(mine["resps"], hf["resps"], strict=True):
                a, b = a[0], b[0]
                if isinstance(b, (tuple, list)):  # loglikelihood: (log-probability, is greedy)
                    assert abs(a[0] - b[0]) <= 1e-4 and a[1] == b[1], (task, mine["doc_id"], a, b)
                elif isinstance(b, float):  # loglikelihood_rolling
                    assert a == pytest.approx(b, rel=ROLLING_RTOL), (task, mine["doc_id"], a, b)
                else:  # generate_until
                    assert a == b, (task, mine["doc_id"], a, b)
        for metric, value in theirs["results"][task].items():
            if "stderr" not in metric and isinstance(value, float):
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-5), (task, metric)


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_every_request_is_answered_as_the_hf_backend_answers_it(tmp_path, tasks, family):
    folder, manager = tasks
    model_dir = write_hf_model(tmp_path / family, family)
    hf = _hf_backend(model_dir)
    loaded = load_model(hf_dir=str(model_dir))
    lm = HarnessModel(loaded.model, loaded.params, loaded.tokenizer, batch_size=4)
    # The tokens first: Llama's tokenizer puts BOS before a text, unless the text starts with it.
    for text in ("The cat sat.", "<s>The cat sat.", " red"):
        assert lm.tok_encode(text) == hf.tok_encode(text), text
        assert lm.tok_encode(text, add_special_tokens=False) == hf.tok_encode(text, add_special_tokens=False)
    assert (lm.tok_encode("The cat")[0] == 1) == (family == "llama")
    theirs = run_tasks(hf, TASK_NAMES, manager=manager, log_samples=True)
    ours = run_tasks(lm, TASK_NAMES, manager=manager, log_samples=True)
    assert_same_answers(ours, theirs)


def test_scores_of_a_batch_are_those_of_a_full_forward_pass(tasks):
    """Padding, widths and shared contexts change nothing: requests scored in one batch score what a full
    forward pass over (context + continuation) does, a request cut from the left included; each context
    goes through the model once per batch, however many continuations it has."""
    folder, _ = tasks
    require_hf()
    loaded = load_model(hf_dir=str(write_hf_model(folder.parent / "single", "gpt_neox")))
    model, params = loaded.model, loaded.params
    lm = HarnessModel(model, params, loaded.tokenizer, batch_size=16)
    question = list(range(10, 30))
    requests = [(None, question, [c]) for c in (40, 41, 42)]  # one context, one-token answers
    requests += [(None, question, [40, 43, 44]), (None, [2], list(range(50, 90))), (None, question[:5], [7, 8])]
    requests += [(None, list(range(100, 160)), list(range(160, 170)))]  # cut from the left to 64 positions
    scores = lm._loglikelihood_tokens(requests, True)
    for (_, ctx, cont), (score, greedy) in zip(requests, scores, strict=True):
        row = (ctx + cont)[-65:]
        logits = model.apply({"params": params}, np.array([row[:-1]]))[0]
        logp = np.asarray(jax.nn.log_softmax(logits))[len(row) - 1 - len(cont):]
        assert score == pytest.approx(sum(logp[k, t] for k, t in enumerate(cont)), abs=1e-4)
        assert greedy == all(int(np.argmax(logp[k])) == t for k, t in enumerate(cont))
    assert lm.scorer.contexts_computed == 4  # the shared question once, the other three contexts once each


def _run(tmp_path, base, tasks_dir, lora: bool):
    """Four steps of fine-tuning the random Llama on the tasks' text (LoRA adapters, or the whole model),
    scoring toy_color at the evaluation that ends them."""
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(corpus() * 8))
    c = default_config()
    c.model.name, c.train.init_from = f"hf:{base}", str(base)
    c.data.source, c.data.tokenizer, c.data.seq_len, c.data.val_fraction = f"text:{text}", f"hf:{base}", 32, 0.25
    if lora:
        c.lora.rank, c.lora.alpha, c.lora.dropout = 4, 8.0, 0.0
    c.optim.lr, c.optim.schedule, c.optim.warmup_steps = 3e-3, "constant", 1
    c.train.global_batch_size, c.train.max_steps, c.train.eval_every, c.train.eval_batches = 8, 4, 4, 1
    c.train.eval_tasks, c.train.eval_tasks_path, c.train.eval_tasks_limit = "toy_color", str(tasks_dir), 8
    c.checkpoint.save_every = 0
    c.logging.tensorboard = True
    train(c, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_evaluate_script_scores_a_run_as_the_hf_backend_scores_its_export(tmp_path, tasks, lora):
    folder, manager = tasks
    base = write_hf_model(tmp_path / "base", "llama")
    workdir = _run(tmp_path, base, folder, lora)
    # In training: the task's metrics at the evaluation, in metrics.jsonl, TensorBoard and loss.png.
    rows = [r for r in read_metrics(workdir) if "task/toy_color/acc" in r]
    assert [r["step"] for r in rows] == [4] and all("val_loss" in r for r in rows)
    events = b"".join(p.read_bytes() for p in (workdir / "tensorboard").glob("events.*"))
    assert b"task/toy_color/acc" in events
    assert (workdir / "loss.png").is_file()

    out = tmp_path / "results.json"
    proc = run_script("evaluate.py", f"--workdir={workdir}", "--tasks=toy_color,toy_story,toy_rolling",
                      f"--include_path={folder}", "--batch_size=4", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "|toy_color" in proc.stdout.replace(" ", "") and f"Results written to {out}" in proc.stdout
    ours = json.loads(out.read_text())
    export_hf(tmp_path / "hf", workdir=workdir)  # LoRA adapters merged
    theirs = run_tasks(_hf_backend(tmp_path / "hf"), ["toy_color", "toy_story", "toy_rolling"], manager=manager)
    for task, metrics in theirs["results"].items():
        for metric, value in metrics.items():
            if "stderr" not in metric and isinstance(value, float):
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-5), (task, metric)
    # The script's row in metrics.jsonl; the last evaluation in training scored the same parameters.
    last = read_metrics(workdir)[-1]
    assert last["step"] == 4 and last["task/toy_color/acc"] == task_metrics(theirs)["task/toy_color/acc"]
    assert rows[-1]["task/toy_color/acc"] == last["task/toy_color/acc"]


def test_evaluate_script_refuses_unknown_tasks_and_foreign_files(tmp_path, tasks):
    folder, _ = tasks
    proc = run_script("evaluate.py", f"--hf_dir={tmp_path}", "--tasks=toy_colour", f"--include_path={folder}")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(
        "evaluate: Unknown task 'toy_colour'; did you mean toy_color"), proc.stderr[-2000:]
    base = write_hf_model(tmp_path / "base", "gpt_neox")
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "notes"}')
    proc = run_script("evaluate.py", f"--hf_dir={base}", "--tasks=toy_color", f"--include_path={folder}",
                      "--limit=2", f"--out={mine}")
    assert proc.returncode == 1 and "is not a results file this program wrote" in proc.stderr, proc.stderr[-2000:]
    assert mine.read_text() == '{"my": "notes"}'
