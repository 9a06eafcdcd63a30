"""Kill a training run with SIGKILL again and again, and check that nothing is lost or changed.

A reference run trains uninterrupted. Then the same command is started in a second workdir and
killed `kills` times, each time at a moment of one of three kinds (in turn): while a checkpoint is
being written (its `*.orbax-checkpoint-tmp` folder exists), while the validation split is being
evaluated (the metrics file ends with the training row of an evaluation step), or a seeded random
moment after the run has made progress. After every kill the metrics file must hold only rows equal
to the reference's (a torn last line aside), and the next start resumes from the last complete
checkpoint. After the last kill the run finishes; its metrics rows must equal the reference's
exactly, in their deterministic fields (everything but timings), and so must its final parameters.
"""

from __future__ import annotations

import dataclasses
import subprocess
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lightjax.train.checkpoint import restore_params
from lightjax.train.metrics import read_metrics

# Row fields that depend on the clock, not on the computation.
TIMING_FIELDS = ("tokens_per_sec", "mfu", "mfu_full_square", "elapsed_s")
MOMENTS = ("during a save", "during an evaluation", "at a random moment")


@dataclasses.dataclass
class Kill:
    moment: str
    killed: bool  # False: the run finished before the moment came
    inside: bool  # the kill cut the save or evaluation short (a partial save left; no validation row yet)
    rows: int  # rows in the metrics file after the kill
    last_step: int
    seconds: float


def rows_of(workdir: Path) -> list[dict[str, Any]]:
    """The metrics rows without their timing fields; a torn last line (a kill mid-write) is dropped."""
    try:
        rows = read_metrics(workdir)
    except ValueError as e:  # damage before the last line: no kill makes that
        raise AssertionError(str(e)) from None
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in rows]


def check_rows(rows: list[dict[str, Any]], reference: list[dict[str, Any]]) -> None:
    """Every row equals the reference row of the same step and kind (training or evaluation)."""
    ref = {(r["step"], "val_loss" in r): r for r in reference}
    for row in rows:
        key = (row["step"], "val_loss" in row)
        if ref.get(key) != row:
            raise AssertionError(f"step {row['step']}: {row} differs from the uninterrupted run's {ref.get(key)}")


def _saving(workdir: Path) -> bool:
    """Whether a checkpoint is being written (its partial folder exists)."""
    return any((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))


def _moment_reached(moment: str, workdir: Path, eval_every: int, start_step: int) -> bool:
    """Whether the run, past the step it had reached before this start (so past its start-up, which
    also cleans up what an earlier kill left), is at `moment`."""
    rows = rows_of(workdir)
    if not rows or rows[-1]["step"] <= start_step:
        return False
    if moment == "during a save":
        return _saving(workdir)
    last = rows[-1]
    if moment == "during an evaluation":
        return "loss" in last and eval_every > 0 and last["step"] % eval_every == 0
    return True


def kill_at(command: list[str], workdir: Path, moment: str, eval_every: int, delay_s: float,
            timeout_s: float = 300) -> Kill:
    """Start `command`, wait for `moment`, then (after `delay_s`) SIGKILL it."""
    rows, start = rows_of(workdir), time.perf_counter()
    start_step = rows[-1]["step"] if rows else 0
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = False
    while proc.poll() is None and time.perf_counter() - start < timeout_s:
        if _moment_reached(moment, workdir, eval_every, start_step):
            time.sleep(delay_s)
            proc.kill()
            killed = True
            break
        time.sleep(0.002)
    _, err = proc.communicate(timeout=60)
    if not killed and proc.returncode != 0:
        raise AssertionError(f"the run failed (status {proc.returncode}): {err[-2000:]}")
    rows = rows_of(workdir)
    if moment == "during a save":
        inside = killed and _saving(workdir)
    else:
        inside = killed and moment == "during an evaluation" and bool(rows) and "loss" in rows[-1]
    return Kill(moment, killed, inside, len(rows), rows[-1]["step"] if rows else 0, time.perf_counter() - start)


def run(command: list[str], reference_dir: Path, workdir: Path, kills: int, seed: int, eval_every: int,
        log: Any = print) -> list[Kill]:
    """The whole experiment (see the module docstring); raises AssertionError on any difference."""
    subprocess.run([*command, f"--workdir={reference_dir}"], check=True, capture_output=True, timeout=1800)
    reference = rows_of(reference_dir)
    rng = np.random.default_rng(seed)
    done = []
    for k in range(kills):
        moment = MOMENTS[k % len(MOMENTS)]
        delay = float(rng.uniform(0, 0.3)) if moment == "at a random moment" else float(rng.uniform(0, 0.01))
        kill = kill_at([*command, f"--workdir={workdir}"], workdir, moment, eval_every, delay)
        check_rows(rows_of(workdir), reference)
        done.append(kill)
        what = ("killed inside it" if kill.inside else "killed") if kill.killed else "finished first"
        log(f"kill {k + 1:2d} {moment:22s}: {what} after {kill.seconds:4.1f} s; the {kill.rows} metrics rows "
            f"(to step {kill.last_step}) equal the uninterrupted run's")
    subprocess.run([*command, f"--workdir={workdir}"], check=True, capture_output=True, timeout=1800)
    final = rows_of(workdir)
    if final != reference:
        raise AssertionError(f"the finished run's {len(final)} rows differ from the uninterrupted run's "
                             f"{len(reference)}")
    _check_same_params(reference_dir, workdir)
    log(f"after {sum(k.killed for k in done)} kills: metrics.jsonl ({len(final)} rows) and the final parameters "
        "equal the uninterrupted run's bit for bit")
    return done


def _check_same_params(a: Path, b: Path) -> None:
    _, params_a, step_a = restore_params(a)
    _, params_b, step_b = restore_params(b)
    if step_a != step_b:
        raise AssertionError(f"final checkpoints differ: step {step_a} vs {step_b}")
    same = jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), params_a, params_b)
    if not all(jax.tree.leaves(same)):
        raise AssertionError("the final parameters differ from the uninterrupted run's")

