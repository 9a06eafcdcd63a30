"""Evaluate a run's checkpoint over a whole split: loss, perplexity, bits per character and byte.

    python scripts/evaluate.py --workdir runs/baseline
    python scripts/evaluate.py --workdir runs/baseline --split test --step 1000

Uses the run's tokenizer, sequence length and batch size; appends the figures as a row to
WORKDIR/metrics.jsonl (keys eval_loss, eval_ppl, eval_bpc, eval_bpb, with `split`).
"""

import sys

from absl import flags

from lightjax.runtime.cli import define_step_flag

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)
_SPLIT = flags.DEFINE_enum("split", "validation", ["train", "validation", "test"], "Split to evaluate.")
_STEP = define_step_flag()
_BATCHES = flags.DEFINE_integer("batches", 0, "Evaluate only this many batches (0: the whole split).")
_LOCAL_PATH = flags.DEFINE_string("local_path", None, "Override the run's data.local_path (another machine).")


def main(argv):
    del argv
    from lightjax.train.checkpoint import CheckpointError
    from lightjax.train.evaluate import evaluate_run

    try:
        r = evaluate_run(_WORKDIR.value, _SPLIT.value, _STEP.value, _BATCHES.value, _LOCAL_PATH.value)
    except (OSError, ValueError, KeyError, CheckpointError) as e:
        sys.exit(f"evaluate: {e}")
    print(f"step {r['step']} | {r['split']}: loss {r['eval_loss']:.4f} | ppl {r['eval_ppl']:.2f} | "
          f"bpc {r['eval_bpc']:.4f} | bpb {r['eval_bpb']:.4f} | {r['eval_tokens']:,} tokens")


if __name__ == "__main__":
    from lightjax.runtime.cli import run_script

    run_script(main, "evaluate")
