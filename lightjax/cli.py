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
