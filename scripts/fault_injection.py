"""Kill a training run with SIGKILL many times (during saves, during evaluations, at random moments)
and check that every resume continues exactly where an uninterrupted run would have been.

    python scripts/fault_injection.py --kills 20 --out runs/faults -- \
        --config configs/smoke.py --config.data.local_path=path/to/input.txt

Everything after `--` goes to scripts/train.py; the run evaluates every --eval_every and saves every
--save_every steps, for --steps steps. Writes OUT/reference (the uninterrupted run) and OUT/killed.
Exit status 1, with the first difference, if anything differs (see lightjax/checks/fault_injection.py).
"""

import subprocess
import sys
from pathlib import Path

from absl import flags

from lightjax.runtime.cli import define_overwrite_flag

_KILLS = flags.DEFINE_integer("kills", 20, "How many times to kill the run.")
_STEPS = flags.DEFINE_integer("steps", 300, "Training steps of the run.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 10, "Evaluate every this many steps.")
_SAVE_EVERY = flags.DEFINE_integer("save_every", 7, "Save a checkpoint every this many steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the kill moments.")
_OUT = flags.DEFINE_string("out", "runs/faults", "Folder for the two runs (an earlier fault injection's is replaced).")
_OVERWRITE = define_overwrite_flag()


def main(argv):
    from lightjax.checks.fault_injection import run
    from lightjax.runtime.files import output_dir

    train = Path(__file__).resolve().parent / "train.py"
    command = [sys.executable, str(train), *argv[1:], f"--config.train.max_steps={_STEPS.value}",
               f"--config.train.eval_every={_EVAL_EVERY.value}", f"--config.checkpoint.save_every={_SAVE_EVERY.value}",
               "--config.train.log_every=1", "--config.logging.tensorboard=False", "--config.checkpoint.keep=2"]
    try:
        with output_dir(_OUT.value, "fault_injection", _OVERWRITE.value) as out:
            kills = run(command, out / "reference", out / "killed", _KILLS.value, _SEED.value, _EVAL_EVERY.value)
    except AssertionError as e:
        sys.exit(f"fault_injection: FAIL: {e}")
    except subprocess.CalledProcessError as e:  # the training command itself failed: its own message
        said = (e.stderr or b"").decode(errors="replace").strip().splitlines() or ["(no output)"]
        sys.exit(f"fault_injection: the training command failed (exit {e.returncode}): {said[-1]}")
    except (OSError, ValueError) as e:
        sys.exit(f"fault_injection: {e}")
    inside = {m: sum(k.inside for k in kills if k.moment == m) for m in ("during a save", "during an evaluation")}
    print(f"PASS: {sum(k.killed for k in kills)} of {len(kills)} kills landed; "
          f"{inside['during a save']} cut a save short, {inside['during an evaluation']} an evaluation.")


if __name__ == "__main__":
    from lightjax.runtime.cli import run_script

    run_script(main, "fault_injection")
