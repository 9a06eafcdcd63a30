"""What the scripts share: flag parsing whose errors are one line, not a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from absl import flags, logging


def one_line_flags_parser(program: str) -> Callable[[list[str]], Any]:
    """A flags parser for `absl.app.run(main, flags_parser=...)`: an unknown config key, a value of the
    wrong type or a malformed flag exits with `program: <what is wrong>` and status 2. Library INFO
    logs are hidden unless --verbosity is given."""

    def parse(argv: list[str]) -> Any:
        try:
            rest = flags.FLAGS(argv)
            if not any(a.startswith(("--verbosity", "-v")) for a in argv[1:]):
                logging.set_verbosity(logging.WARNING)  # TFDS and Orbax log progress at INFO level
            return rest
        except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
            message = str(e)
            if isinstance(e, (AttributeError, KeyError)):  # ml_collections wraps a KeyError's text in reprs
                inner = e.args[0] if e.args else e
                while isinstance(inner, BaseException) and inner.args:
                    inner = inner.args[0]
                message = f"unknown config key {inner}"
            message = " ".join(message.split())
            sys.stderr.write(f"{program}: {message}\n")
            sys.exit(2)

    return parse


def simulate_host_devices(count: int) -> None:
    """Make the CPU backend expose `count` devices (a laptop's stand-in for 8 accelerators).
    Only effective before JAX initialises its backends, so scripts call it first thing in main()."""
    if count:
        flag = f"--xla_force_host_platform_device_count={count}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the simulated devices, even where a TPU compiler is installed


def define_distributed_flags() -> Callable[[], None]:
    """--distributed and the explicit --coordinator_address / --num_processes / --process_id of a
    multi-process job; returns the function that joins it (a no-op without --distributed)."""
    distributed = flags.DEFINE_bool(
        "distributed", False, "Multi-host: join JAX's distributed runtime first. Without the three flags "
        "below, the cluster is auto-detected (TPU VMs, Slurm, ...).")
    address = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's coordinator.")
    count = flags.DEFINE_integer("num_processes", None, "How many processes the job has.")
    index = flags.DEFINE_integer("process_id", None, "This process's index, in [0, num_processes).")
    heartbeat = flags.DEFINE_integer("heartbeat_timeout_s", 60, "A process silent this long is taken as dead "
                                     "and the whole job stops.")

    def start() -> None:
        explicit = any(f.value is not None for f in (address, count, index))
        if not (distributed.value or explicit):
            return
        from lightjax.distributed import initialize

        initialize(address.value, count.value, index.value, heartbeat.value)

    return start
