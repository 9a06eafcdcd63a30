"""Train a GPT as configured: the front door.

    python scripts/train.py --config configs/baseline.py
    python scripts/train.py --config configs/baseline.py --config.data.local_path=path/to/input.txt  # offline
    python scripts/train.py --config configs/baseline.py --workdir runs/mine --config.mesh.fsdp=-1

Re-running the same command with the same --workdir resumes from its latest checkpoint.
"""

import os
import sys
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/baseline.py", "Run config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default runs/<config name>-<timestamp>).")
_HOST_DEVICES = flags.DEFINE_integer("host_devices", 0, "Simulate this many CPU devices (sets XLA_FLAGS).")


def main(argv):
    del argv
    if _HOST_DEVICES.value:  # before JAX initialises its backends
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={_HOST_DEVICES.value}")
    from lightjax.checkpoint import CheckpointError
    from lightjax.trainer import train

    config_name = Path(config_flags.get_config_filename(flags.FLAGS["config"])).stem
    workdir = _WORKDIR.value or f"runs/{config_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        summary = train(_CONFIG.value, workdir)
    except (ValueError, OSError, KeyError, CheckpointError, FloatingPointError) as e:
        sys.exit(f"train: {e}")
    print(f"Done: {summary['step']} steps, {summary['tokens_seen']:,} tokens, {summary['elapsed_s']:.1f} s, "
          f"best val loss {summary['best_val_loss']:.4f}; files in {summary['workdir']}.", flush=True)


if __name__ == "__main__":
    app.run(main)
