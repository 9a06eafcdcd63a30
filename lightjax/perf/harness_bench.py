"""Requests per second of lightjax's harness model against the harness's own `hf` backend (transformers in
PyTorch) on the same model and tasks on this machine: what `scripts/benchmark.py --harness` prints.

The model is a preset with random weights and a byte-level BPE tokenizer trained on the given text, saved
as a Hugging Face folder that both load. The tasks are local ones drawn from the text, shaped like the
harness's common ones: a HellaSwag-like choice (a passage, four endings of one or two lines), a
wikitext-like rolling log-likelihood over longer passages, and a short greedy generation up to a newline.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lightjax.convert.hf import save_hf_checkpoint
from lightjax.model.config import ModelConfig
from lightjax.model.gpt import GPT
from lightjax.perf.prepare_bench import train_bpe
from lightjax.train.tasks import metric, write_json_task

TASKS = ("bench_choice", "bench_rolling", "bench_generate")


def write_model(folder: str | Path, text_file: Path, preset: str, vocab: int = 8192) -> Path:
    """`preset` with random weights (seeded) and a BPE of `vocab` ids trained on `text_file`, as a Hugging
    Face folder."""
    folder = Path(folder)
    train_bpe(folder, [text_file], vocab)
    eos = json.loads((folder / "config.json").read_text())["eos_token_id"]
    cfg = ModelConfig.from_name(preset, vocab_size=vocab, padded_vocab_size=None)
    params = GPT(cfg).init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))["params"]
    save_hf_checkpoint(folder, jax.tree.map(np.asarray, params), cfg, token_ids={"eos_token_id": eos})
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "eos_token": "<|endoftext|>"}))
    return folder


def write_tasks(folder: str | Path, text: str, docs: int = 64, fewshot: int = 0, seed: int = 0) -> Path:
    """The three tasks' YAML and JSON files in `folder`: `docs` choice documents (with `fewshot` solved
    examples before each, drawn from as many more), docs/4 rolling passages and docs/2 generation prompts,
    from `text`'s lines."""
    lines = [line for line in text.splitlines() if line.strip()]
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(lines) - 64, size=2 * docs)
    choice = []
    for i, s in enumerate(starts):
        ending = " ".join(lines[s + 6:s + 6 + 1 + i % 2])
        others = [" ".join(lines[j:j + 1 + i % 2]) for j in rng.integers(0, len(lines) - 2, size=3)]
        choices = others[: i % 4] + [ending] + others[i % 4:]
        choice.append({"context": "\n".join(lines[s:s + 6]), "choices": choices, "answer": i % 4})
    rolling = [{"text": "\n".join(lines[s:s + 48])} for s in starts[: docs // 4]]
    generate = [{"context": "\n".join(lines[s:s + 4]) + "\n", "answer": lines[s + 4]} for s in starts[: docs // 2]]
    specs = {
        "bench_choice": (choice, {"output_type": "multiple_choice", "doc_to_text": "{{context}}\n",
                                  "num_fewshot": fewshot, "fewshot_split": "train",
                                  "target_delimiter": "", "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
                                  "metric_list": [metric("acc"), metric("acc_norm")]}),
        "bench_rolling": (rolling, {"output_type": "loglikelihood_rolling", "doc_to_text": "",
                                    "doc_to_target": "{{text}}",
                                    "metric_list": [metric("word_perplexity", "weighted_perplexity", False)]}),
        "bench_generate": (generate, {"output_type": "generate_until", "doc_to_text": "{{context}}",
                                      "doc_to_target": "{{answer}}", "metric_list": [metric("exact_match")],
                                      "generation_kwargs": {"until": ["\n"], "max_gen_toks": 24, "do_sample": False}}),
    }
    for name, (rows, spec) in specs.items():  # only the choice task has documents left for few-shot examples
        write_json_task(folder, name, {"test": rows[:docs], **({"train": rows[docs:]} if rows[docs:] else {})}, spec)
    return Path(folder)


def timed_run(lm: Any, manager: Any, tasks: tuple[str, ...] = TASKS) -> dict[str, Any]:
    """Seconds for the harness to run `tasks` with `lm` (tasks loaded, requests built, answered, scored),
    and how many requests of each kind it answered."""
    from lightjax.train.tasks import run_tasks

    start = time.perf_counter()
    results = run_tasks(lm, tasks, manager=manager, log_samples=True)
    seconds = time.perf_counter() - start
    requests = {t: sum(len(s["resps"]) for s in results["samples"][t]) for t in tasks}
    return {"seconds": seconds, "requests": sum(requests.values()), "by_task": requests,
            "requests_per_s": sum(requests.values()) / seconds, "results": results["results"]}


def compare(model_dir: Path, tasks_dir: Path, batch_size: int) -> list[dict[str, Any]]:
    """lightjax cold (its first run compiles), the hf backend, then lightjax warm: each a timed_run, with
    its backend's name."""
    from lm_eval.models.huggingface import HFLM

    from lightjax.train.harness import HarnessModel
    from lightjax.train.load import load_model
    from lightjax.train.tasks import task_manager

    manager = task_manager(TASKS, str(tasks_dir))
    loaded = load_model(hf_dir=str(model_dir))
    ours = HarnessModel(loaded.model, loaded.params, loaded.tokenizer, batch_size=batch_size, quiet=True)
    theirs = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=batch_size)
    out = []
    for name, lm in (("lightjax (first run, compiling)", ours), ("lm-eval hf (transformers)", theirs),
                     ("lightjax", ours)):
        r = timed_run(lm, manager)
        r["backend"] = name
        out.append(r)
    return out


def format_result(r: dict[str, Any], baseline: float | None = None) -> str:
    kinds = ", ".join(f"{n} {t.removeprefix('bench_')}" for t, n in r["by_task"].items())
    ratio = f" | {r['requests_per_s'] / baseline:.2f}x the hf backend" if baseline else ""
    return (f"{r['backend']}: {r['requests']} requests ({kinds}) in {r['seconds']:.1f} s | "
            f"{r['requests_per_s']:.1f} requests/s{ratio}")
