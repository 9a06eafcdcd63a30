"""lm-evaluation-harness tasks run on a `HarnessModel`: which tasks (the harness's own, or YAML files in a
folder of the user's), the run itself, and its results as the harness prints them, as a JSON file and as
flat metrics (`task/NAME/METRIC`) for metrics.jsonl, TensorBoard and the plots.

The harness (EleutherAI's `lm-eval`, the `eval` extra) owns the tasks: their data, prompts, few-shot
examples and metrics are exactly those every other backend is scored with.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from etils import epath

from lightjax.runtime.files import OutputRefused, write_atomic

RESULTS_MARKER = "lightjax_tasks"  # a key of every results file written here: such a file may be replaced


def metric(name: str, aggregation: str = "mean", higher_is_better: bool = True) -> dict[str, Any]:
    """One entry of a task's metric_list, its aggregation and direction stated (the harness warns otherwise)."""
    return {"metric": name, "aggregation": aggregation, "higher_is_better": higher_is_better}


def write_json_task(folder: str | epath.PathLike, name: str, splits: dict[str, list[dict[str, Any]]],
                    spec: dict[str, Any]) -> epath.Path:
    """A task of your own for `include_path`: its documents as FOLDER/NAME-SPLIT.jsonl and FOLDER/NAME.yaml,
    the harness's task config over them (`spec`: output_type, doc_to_text, doc_to_target, metric_list, ...).
    `splits` holds 'test' and, for few-shot examples, 'train'. Returns the YAML file."""
    folder = epath.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in splits.items():
        files[split] = str(folder / f"{name}-{split}.jsonl")
        epath.Path(files[split]).write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": files}, "test_split": "test",
              **({"training_split": "train"} if "train" in files else {}), **spec}
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    return path


def parse_tasks(spec: str | Sequence[str]) -> list[str]:
    """'hellaswag, arc_easy' or a sequence of names -> ['hellaswag', 'arc_easy'] (none empty)."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    return [n.strip() for n in names if n.strip()]


def task_manager(tasks: Sequence[str], include_path: str | None = None) -> Any:
    """A TaskManager that knows `tasks`: the folder's alone when it holds them all (indexing the harness's
    own ~15,000 tasks takes seconds), else the harness's and the folder's. A name it does not know is a
    ValueError naming it and the closest known names."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not epath.Path(include_path).is_dir():
        raise ValueError(f"include_path={include_path!r} is not a folder (of the harness's YAML task files).")
    manager = None
    if include_path is not None:
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if not set(tasks) <= _known(manager):
            manager = None
    manager = manager or TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in _known(manager)]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(_known(manager)), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"Unknown task {unknown[0]!r}{hint} (`lm_eval ls tasks` lists the harness's; a YAML file "
                         "of your own goes in a folder given as include_path).")
    return manager


def _known(manager: Any) -> set[str]:
    return set(manager.all_tasks)


def run_tasks(lm: Any, tasks: Sequence[str], *, limit: int | float | None = None, num_fewshot: int | None = None,
              include_path: str | None = None, manager: Any = None, log_samples: bool = False) -> dict[str, Any]:
    """The harness's `simple_evaluate` of `lm` on `tasks` (at most `limit` documents of each, if given) with
    its default seeds: its results dict (results, versions, n-shot, config; samples with `log_samples`)."""
    import lm_eval

    if not tasks:
        raise ValueError("No task given: name one or more, e.g. --tasks=hellaswag,arc_easy.")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit={limit} is not a positive number of documents (or a fraction of them).")
    manager = manager or task_manager(tasks, include_path)
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                   task_manager=manager, log_samples=log_samples,
                                   torch_random_seed=None)  # torch seeds nothing here; not imported for it


def task_metrics(results: dict[str, Any]) -> dict[str, float]:
    """{'task/arc_easy/acc': 0.61, 'task/arc_easy/acc_norm': 0.58, ...}: each task's metrics (standard
    errors left out; a filter other than 'none' named after the metric, as in 'exact_match_strict-match')."""
    out = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or "stderr" in metric or not isinstance(value, (int, float)):
                continue
            name = metric if filter_name == "none" else f"{metric}_{filter_name}"
            out[f"task/{task}/{name}"] = float(value)
    return {k: v for k, v in out.items() if math.isfinite(v)}


def results_table(results: dict[str, Any]) -> str:
    """The harness's own Markdown table of the results (and of the groups', if any)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    return table + ("\n" + make_table(results, "groups") if results.get("groups") else "")


def check_results_path(path: str | epath.PathLike, overwrite: bool = False) -> None:
    """Refuse (OutputRefused, one line) a path holding a file that is not a results file written here,
    unless `overwrite`: said before any work is done."""
    path = epath.Path(path)
    if path.exists() and not overwrite and not _is_results_file(path):
        raise OutputRefused(f"{path} exists and is not a results file this program wrote: choose another --out, "
                            "or pass --overwrite to replace it.")


def write_results(path: str | epath.PathLike, results: dict[str, Any], model: str, overwrite: bool = False) -> None:
    """The results (without per-document samples) as JSON at `path`, atomically (`check_results_path`)."""
    check_results_path(path, overwrite)
    path = epath.Path(path)
    kept = {k: v for k, v in results.items() if k != "samples"}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({RESULTS_MARKER: model, **kept}, indent=1, default=str))


def _is_results_file(path: epath.Path) -> bool:
    try:
        return RESULTS_MARKER in json.loads(path.read_text())
    except (ValueError, OSError, UnicodeDecodeError, TypeError):
        return False


def with_tasks(evaluate_params: Callable[[Any], dict[str, float]], run: Any, tokenizer: Any,
               config: Any) -> Callable[[Any], dict[str, float]]:
    """`evaluate_params` (the validation loss of a run's params) followed by config.train.eval_tasks on the
    same params, in place on the run's mesh: at most eval_tasks_limit documents of each, contexts of at most
    data.seq_len tokens, the training step's batch size. The tasks are found (or refused) now, not at the
    first evaluation."""
    from lightjax.train.harness import HarnessModel

    t = config.train
    names = parse_tasks(t.eval_tasks)
    manager = task_manager(names, t.eval_tasks_path or None)
    lm = HarnessModel(run.model, None, tokenizer, batch_size=t.global_batch_size // t.grad_accum_steps,
                      max_length=min(config.data.seq_len, run.model.config.block_size), mesh=run.mesh,
                      rules=run.rules, quiet=True)

    def evaluate(params: Any) -> dict[str, float]:
        lm.params = params
        scores = task_metrics(run_tasks(lm, names, limit=t.eval_tasks_limit, manager=manager))
        return {**evaluate_params(params), **scores}

    return evaluate
