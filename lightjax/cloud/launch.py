"""Several local processes joined as one JAX job: a laptop's stand-in for a multi-host run.

`launch(N, D, command)` starts N copies of `command` (a Python script and its flags), each with D
simulated CPU devices and `--coordinator_address/--num_processes/--process_id` for a coordinator on
a free local port, the way each host of a TPU pod slice runs the same command. Their output lines are
prefixed with the process index. If one process fails, the others are stopped (they would otherwise
wait for it in their next collective) and the launcher exits with the failure's status. SIGINT and
SIGTERM are passed on to every process, so that they save a checkpoint and exit together.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

GRACE_S = 10.0  # after a failure, how long the others get to exit on SIGTERM before SIGKILL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices_per_process: int) -> dict[str, str]:
    env = dict(os.environ)
    if devices_per_process:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices_per_process}"])
        env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the prefixer as they are printed
    return env


def _relay(index: int, stream: IO[str], lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            sys.stdout.write(f"[{index}] {line}")
            sys.stdout.flush()


def _describe(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def launch(processes: int, devices_per_process: int, command: Sequence[str], port: int | None = None) -> int:
    """Run `command` as `processes` joined processes; returns the job's exit status."""
    if processes < 1:
        raise ValueError(f"--processes={processes} must be >= 1.")
    if not command:
        raise ValueError("No command given: put the script and its flags after --, e.g. "
                         "-- scripts/train.py --config configs/smoke.py --workdir runs/x.")
    address = f"127.0.0.1:{port or free_port()}"
    env, lock = _env(devices_per_process), threading.Lock()
    children, relays = [], []
    for i in range(processes):
        args = [sys.executable, *command, f"--coordinator_address={address}", f"--num_processes={processes}",
                f"--process_id={i}"]
        child = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        children.append(child)
        relays.append(threading.Thread(target=_relay, args=(i, child.stdout, lock), daemon=True))
        relays[-1].start()

    def forward(signum: int, frame: object) -> None:
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = _wait(children)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for r in relays:
            r.join(timeout=5)
    return status


def _wait(children: list[subprocess.Popen]) -> int:
    """0 when every process succeeds; else the first failure's status, after stopping the others."""
    while True:
        codes = [c.poll() for c in children]
        failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            index, code = failed[0]
            _stop(children)
            print(f"launch: process {index} {_describe(code)}; stopped the other processes.", file=sys.stderr,
                  flush=True)
            return code if code > 0 else 128 - code
        if all(code == 0 for code in codes):
            return 0
        time.sleep(0.2)


def _stop(children: list[subprocess.Popen]) -> None:
    alive = [c for c in children if c.poll() is None]
    for c in alive:
        c.terminate()
    deadline = time.time() + GRACE_S
    for c in alive:
        try:
            c.wait(timeout=max(deadline - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            c.kill()
            c.wait()
