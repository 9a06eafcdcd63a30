"""Run a script as several local processes joined into one JAX job (try a multi-host layout on a laptop).

    python scripts/launch.py --processes 2 --devices_per_process 4 -- \
        scripts/train.py --config configs/smoke.py --workdir runs/two-hosts --config.mesh.fsdp=8

Each process gets its own simulated CPU devices and the coordinator flags; output lines start with
the process index. If one process fails, the others are stopped and the exit status is non-zero.
"""

import sys

from absl import flags

_PROCESSES = flags.DEFINE_integer("processes", 2, "How many processes (stand-ins for hosts).")
_DEVICES = flags.DEFINE_integer("devices_per_process", 4, "Simulated CPU devices per process (0: leave the "
                                "platform and devices alone).")
_PORT = flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1 (0: a free one).")


def main(argv):
    from lightjax.cloud.launch import launch

    try:
        status = launch(_PROCESSES.value, _DEVICES.value, argv[1:], _PORT.value or None)
    except ValueError as e:
        sys.exit(f"launch: {e}")
    sys.exit(status)


if __name__ == "__main__":
    from lightjax.runtime.cli import run_script

    run_script(main, "launch")
