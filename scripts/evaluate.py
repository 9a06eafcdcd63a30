"""Evaluate a model: a run's loss over a split, or lm-evaluation-harness tasks on any model.

    python scripts/evaluate.py --workdir runs/baseline
    python scripts/evaluate.py --workdir runs/baseline --split test --step 1000
    python scripts/evaluate.py --workdir runs/pythia --tasks hellaswag,arc_easy --limit 200
    python scripts/evaluate.py --hf_dir path/to/hf_model --tasks arc_easy,piqa --num_fewshot 0
    python scripts/evaluate.py --export_dir exports/qwen3 --tasks my_task --include_path my_tasks/

Without --tasks: a run's checkpoint over a whole split with the run's tokenizer, sequence length and batch
size; appends the figures as a row to WORKDIR/metrics.jsonl (eval_loss, eval_ppl, eval_bpc, eval_bpb, split).
With --tasks: the harness's tasks (its own, or YAML files in --include_path), scored by lightjax's forward
pass and generation as the harness's `hf` backend scores the model's Hugging Face export; prints the
harness's table and writes the results as JSON (--out; a run's default WORKDIR/lm_eval/step_N.json, its
metrics also appended to WORKDIR/metrics.jsonl as task/NAME/METRIC).
"""

import sys

from absl import flags

from lightjax.runtime.cli import define_overwrite_flag, define_step_flag

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "With --tasks: a Hugging Face model directory instead of --workdir.")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "With --tasks: an export directory instead of --workdir.")
_SPLIT = flags.DEFINE_enum("split", "validation", ["train", "validation", "test"], "Split to evaluate.")
_STEP = define_step_flag()
_BATCHES = flags.DEFINE_integer("batches", 0, "Evaluate only this many batches (0: the whole split).")
_LOCAL_PATH = flags.DEFINE_string("local_path", None, "Override the run's data.local_path (another machine).")
_TASKS = flags.DEFINE_list("tasks", [], "lm-evaluation-harness tasks, e.g. hellaswag,arc_easy,piqa.")
_LIMIT = flags.DEFINE_float("limit", None, "At most this many documents of each task (below 1: a fraction).")
_NUM_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "Few-shot examples per prompt (default: each task's own).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Rows per forward pass for --tasks.", lower_bound=1)
_INCLUDE_PATH = flags.DEFINE_string("include_path", None, "A folder of task YAML files of your own, for --tasks.")
_OUT = flags.DEFINE_string("out", None, "With --tasks: the results JSON file (a run's default: "
                           "WORKDIR/lm_eval/step_N.json).")
_OVERWRITE = define_overwrite_flag()


def evaluate_split():
    from lightjax.train.evaluate import evaluate_run

    if not _WORKDIR.value:
        raise ValueError("give --workdir (a run's split), or --tasks with one of --workdir, --hf_dir, --export_dir.")
    r = evaluate_run(_WORKDIR.value, _SPLIT.value, _STEP.value, _BATCHES.value, _LOCAL_PATH.value)
    print(f"step {r['step']} | {r['split']}: loss {r['eval_loss']:.4f} | ppl {r['eval_ppl']:.2f} | "
          f"bpc {r['eval_bpc']:.4f} | bpb {r['eval_bpb']:.4f} | {r['eval_tokens']:,} tokens")


def evaluate_tasks():
    import time

    import jax

    from lightjax.train.harness import HarnessModel
    from lightjax.train.load import load_model
    from lightjax.train.metrics import append_row
    from lightjax.train.tasks import (
        check_results_path,
        results_table,
        run_tasks,
        task_manager,
        task_metrics,
        write_results,
    )

    if _OUT.value:  # an unknown task or a path that is not ours is said before the model loads
        check_results_path(_OUT.value, _OVERWRITE.value)
    manager = task_manager(_TASKS.value, _INCLUDE_PATH.value)
    loaded = load_model(_WORKDIR.value, _STEP.value, _HF_DIR.value, _EXPORT_DIR.value)
    out = _OUT.value or (f"{_WORKDIR.value}/lm_eval/step_{loaded.step}.json" if _WORKDIR.value else None)
    lm = HarnessModel(loaded.model, loaded.params, loaded.tokenizer, batch_size=_BATCH_SIZE.value)
    limit = _LIMIT.value if _LIMIT.value is None or _LIMIT.value < 1 else int(_LIMIT.value)
    start = time.perf_counter()
    results = run_tasks(lm, _TASKS.value, limit=limit, num_fewshot=_NUM_FEWSHOT.value, manager=manager)
    seconds = time.perf_counter() - start
    print(f"# {loaded.description}: {', '.join(_TASKS.value)} in {seconds:.1f} s "
          f"({lm.scorer.contexts_computed:,} contexts through the model)\n{results_table(results)}")
    if jax.process_index() != 0:
        return
    if out:
        write_results(out, results, loaded.description, _OVERWRITE.value)
        print(f"Results written to {out}")
    if _WORKDIR.value:
        append_row(_WORKDIR.value, {"step": loaded.step, **task_metrics(results)})


def main(argv):
    del argv
    from lightjax.train.checkpoint import CheckpointError

    try:
        evaluate_tasks() if _TASKS.value else evaluate_split()
    except (OSError, ValueError, KeyError, CheckpointError) as e:
        sys.exit(f"evaluate: {e}")


if __name__ == "__main__":
    from lightjax.runtime.cli import run_script

    run_script(main, "evaluate")
