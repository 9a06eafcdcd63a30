"""Several processes, one run: joining JAX's distributed runtime, and who does what.

Every host (or every local process standing in for one) runs the same command. They differ only in
`jax.process_index()`. The rules the rest of the library follows:

- Process 0 alone writes the run's files (config, metrics, tokenizer, prepared data, plots) and
  prints; arrays are written by all, each its own shards (Orbax).
- Work that must happen once (preparing a dataset, building the tokenizer) runs on process 0 while
  the others wait at a barrier; its failure reaches every process as one error, not a hang.
- Decisions that end the loop (a time limit, a stop signal) are agreed by all processes, since each
  must run the same collectives in the same order.
- A process that dies stops the others: JAX's coordination service notices its missing heartbeats
  and terminates every process of the job (after `heartbeat_timeout_s`), rather than leaving them
  waiting in a collective forever.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

T = TypeVar("T")

HEARTBEAT_TIMEOUT_S = 60  # JAX's default is 100 s; a dead peer should end the job within a minute or so


class DistributedError(RuntimeError):
    pass


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S) -> None:
    """Join the job. Explicit values win; without them a SkyPilot job's node environment gives them
    (`skypilot_job`), else JAX detects the cluster (TPU VMs, Slurm, ...)."""
    if coordinator_address is None and num_processes is None and process_id is None:
        coordinator_address, num_processes, process_id = skypilot_job() or (None, None, None)
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    if any(v is not None for v in given.values()) and any(v is None for v in given.values()):
        missing = ", ".join(f"--{k}" for k, v in given.items() if v is None)
        raise DistributedError(f"Give all of --coordinator_address, --num_processes and --process_id, or none "
                               f"(cluster auto-detection); missing {missing}.")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise DistributedError(f"--process_id={process_id} must be in [0, --num_processes={num_processes}).")
    if coordinator_address is not None:
        _check_address(coordinator_address)
        if process_id:  # process 0 serves the coordinator; the others must reach it
            _wait_for_coordinator(coordinator_address, heartbeat_timeout_s)
    try:
        # A coordinator that cannot be reached fails the job within the heartbeat time (JAX waits 300 s).
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=heartbeat_timeout_s,
                                   heartbeat_timeout_seconds=heartbeat_timeout_s)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if coordinator_address is not None:
            raise DistributedError(f"Could not join the job at --coordinator_address={coordinator_address} within "
                                   f"{heartbeat_timeout_s} s ({first[:200]}). Is process 0 running there, and is the "
                                   "address reachable from this host?") from None
        raise DistributedError(f"jax.distributed.initialize failed: {first}. Outside a TPU VM or Slurm job, give "
                               "--coordinator_address=HOST:PORT --num_processes=N --process_id=I.") from None


COORDINATOR_PORT = 8476  # the head node's port for JAX's coordinator in a SkyPilot job (LIGHTJAX_COORDINATOR_PORT)


def skypilot_job(env: dict[str, str] | None = None) -> tuple[str, int, int] | None:
    """(coordinator address, process count, this process's index) of a SkyPilot job, one process per node
    (each drives all of its node's accelerators), from the environment SkyPilot gives every node:
    SKYPILOT_NODE_RANK, SKYPILOT_NUM_NODES and SKYPILOT_NODE_IPS (one per line, the head's first); the
    coordinator listens on the head node at LIGHTJAX_COORDINATOR_PORT (default 8476). None outside one.
    JAX's own cluster detection does not know SkyPilot."""
    env = os.environ if env is None else env
    if "SKYPILOT_NODE_RANK" not in env:
        return None
    names = {k: env.get(k, "") for k in ("SKYPILOT_NODE_RANK", "SKYPILOT_NUM_NODES", "SKYPILOT_NODE_IPS")}
    ips = [ip.strip() for ip in names["SKYPILOT_NODE_IPS"].splitlines() if ip.strip()]
    port = env.get("LIGHTJAX_COORDINATOR_PORT", str(COORDINATOR_PORT))
    try:
        rank, nodes, port_number = int(names["SKYPILOT_NODE_RANK"]), int(names["SKYPILOT_NUM_NODES"]), int(port)
        ok = 0 <= rank < nodes == len(ips) and 0 < port_number < 65536
    except ValueError:
        ok = False
    if not ok:
        shown = ", ".join(f"{k}={v!r}" for k, v in names.items())
        raise DistributedError(f"The SkyPilot node environment is not one of a job: {shown}, "
                               f"LIGHTJAX_COORDINATOR_PORT={port!r} (want a rank in [0, SKYPILOT_NUM_NODES), one IP "
                               "per node, a port in [1, 65535]). Give --coordinator_address, --num_processes and "
                               "--process_id instead.")
    return f"{ips[0]}:{port_number}", nodes, rank


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Wait until the coordinator's port accepts connections (process 0 may start later), at most
    `timeout_s`: past that JAX's client aborts the process with a C++ stack trace instead of an error."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=min(5.0, timeout_s)).close()
            return
        except socket.gaierror as e:
            raise DistributedError(f"--coordinator_address={address}: the host {host!r} is unknown ({e.strerror})."
                                   ) from None
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedError(f"Could not reach the coordinator at --coordinator_address={address} within "
                                       f"{timeout_s:g} s ({e.strerror or e}). Is process 0 running there, and is the "
                                       "address reachable from this host?") from None
            time.sleep(0.5)


def _check_address(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or host.startswith("[") != host.endswith("]"):
        raise DistributedError(f"--coordinator_address={address!r} is not HOST:PORT (e.g. 10.0.0.2:8476, or "
                               "[::1]:8476 for IPv6), the port a number in [1, 65535].")


def is_leader() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process has reached the barrier called `name`."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def leader_value(value: Any) -> Any:
    """Process 0's `value` (a number or an array) on every process."""
    if jax.process_count() == 1:
        return value
    return multihost_utils.broadcast_one_to_all(np.asarray(value))


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on at least one."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def run_once(name: str, fn: Callable[[], T]) -> T | None:
    """`fn()` on process 0 while the others wait; its exception is raised there, and the others raise
    a DistributedError naming `name`. Returns fn's result on process 0, None elsewhere."""
    result, failure = None, None
    if is_leader():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 (re-raised below, after the others have been told)
            failure = e
    if int(leader_value(failure is not None)):
        if failure is not None:
            raise failure
        raise DistributedError(f"{name} failed on process 0; its output says why.")
    return result


def run_everywhere(name: str, fn: Callable[[], T]) -> T:
    """`fn()` on every process; where it fails, its exception is raised there and the other processes raise
    a DistributedError naming `name`, so that none waits for the failed one."""
    result, failure = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 (re-raised below, after the others have been told)
        failure = e
    if any_process(failure is not None):
        if failure is not None:
            raise failure
        raise DistributedError(f"{name} failed on another process; its output says why.")
    return result  # type: ignore[return-value]


def print_once(text: str) -> None:
    """Print from process 0 only (every process runs the same code; one log is enough)."""
    if is_leader():
        print(text, flush=True)


def exit_with_error(message: str, status: int = 1) -> None:
    """Print `message` (one line) and exit with `status`. Exit at once, not through Python's shutdown,
    where that would wait: in a multi-process job JAX's shutdown waits (minutes) for processes that are
    themselves waiting for this one in a collective (its silence makes the coordination service stop
    them instead), and after a failed save Orbax's background threads wait for signals that never come."""
    sys.stderr.write(message.rstrip() + "\n")
    sys.stderr.flush()
    stuck = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if jax.process_count() > 1 or stuck:
        sys.stdout.flush()
        os._exit(status)
    sys.exit(status)
