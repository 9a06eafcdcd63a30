"""Train a GPT as configured: the front door.

    python scripts/train.py --config configs/baseline.py
    python scripts/train.py --config configs/baseline.py --config.data.local_path=path/to/input.txt  # offline
    python scripts/train.py --config configs/baseline.py --workdir runs/mine --config.mesh.fsdp=-1
    python scripts/train.py --config configs/baseline.py --workdir gs://bucket/run --distributed  # every TPU host

Re-running the same command with the same --workdir resumes from its latest checkpoint.
"""

import sys
import time
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from lightjax.runtime.cli import define_distributed_flags, host_devices

_CONFIG = config_flags.DEFINE_config_file("config", "configs/baseline.py", "Run config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default runs/<config name>-<timestamp>).")
_HOST_DEVICES = flags.DEFINE_integer("host_devices", 0, "CPU devices (sets XLA_FLAGS); 0: one per core where the "
                                     "run can train data-parallel over them (lightjax.runtime.cli.host_devices).")
_START_DISTRIBUTED = define_distributed_flags()


def main(argv):
    del argv
    host_devices(_HOST_DEVICES.value, _CONFIG.value, multi_process=_START_DISTRIBUTED.requested())
    import jax

    from lightjax.runtime.distributed import DistributedError, exit_with_error

    try:
        _START_DISTRIBUTED()  # before anything touches a device
    except DistributedError as e:
        sys.exit(f"train: {e}")
    from lightjax.runtime.files import WorkdirLocked
    from lightjax.runtime.logs import quiet_orbax_errors
    from lightjax.train.checkpoint import CheckpointError
    from lightjax.train.trainer import train

    quiet_orbax_errors()  # a failed save is one line of ours, not Orbax's threads' tracebacks

    if _WORKDIR.value is None and jax.process_count() > 1:
        sys.exit("train: a multi-process job needs --workdir (the same on every process: each would pick its own "
                 "timestamped default).")
    config_name = Path(config_flags.get_config_filename(flags.FLAGS["config"])).stem
    workdir = _WORKDIR.value or f"runs/{config_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        summary = train(_CONFIG.value, workdir)
    except (ValueError, OSError, KeyError, CheckpointError, FloatingPointError, DistributedError,
            WorkdirLocked) as e:
        exit_with_error(f"train: {e}")
    if jax.process_index() == 0:
        best = summary["best_val_loss"]
        print(f"Done: {summary['step']} steps, {summary['tokens_seen']:,} tokens, {summary['elapsed_s']:.1f} s "
              f"in all, {summary['tokens_per_sec']:,.0f} tok/s in this invocation, best val loss "
              f"{'n/a' if best == float('inf') else f'{best:.4f}'}; files in {summary['workdir']}.", flush=True)


if __name__ == "__main__":
    from lightjax.runtime.cli import run_script

    try:
        run_script(main, "train")
    except KeyboardInterrupt:  # Ctrl-C before the loop's handler is in place, or a second one inside the loop
        sys.stderr.write("train: interrupted by Ctrl-C; the same command resumes from the last checkpoint.\n")
        sys.exit(130)
