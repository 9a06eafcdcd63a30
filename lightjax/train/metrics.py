"""A run's metrics: every logged row to WORKDIR/metrics.jsonl and, when enabled, TensorBoard and Weights &
Biases (only process 0 writes); reading them back, the CSV and the loss plot written at the end of a run.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from typing import Any

import jax
from etils import epath

from lightjax.runtime.files import write_atomic
from lightjax.runtime.packages import missing_package_message


def _summary_writer() -> Any:
    """tensorboardX's SummaryWriter class, imported without importing torch where nothing has yet:
    tensorboardX imports torch (when installed) only to accept torch tensors, which costs a run's
    start-up about a second, and the rows logged here are floats."""
    block = "torch" not in sys.modules
    if block:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        if block:
            del sys.modules["torch"]
    return SummaryWriter


class MetricWriters:
    """Every logged row goes to WORKDIR/metrics.jsonl and, when enabled, TensorBoard and W&B.
    Only process 0 writes; the other processes of a multi-host run keep quiet.

    A local metrics.jsonl is appended to as rows come. Object stores (gs://) cannot append: there the
    file is rewritten whole at every `flush()` (the trainer flushes at each checkpoint) and at close."""

    def __init__(self, workdir: epath.Path, resume_step: int, tensorboard: bool = True, wandb_project: str = "",
                 config: dict[str, Any] | None = None):
        self.enabled = jax.process_index() == 0
        self.path = workdir / "metrics.jsonl"
        self._tb = self._wandb = self._file = None
        self._rows: list[str] = []  # every line of the file, for object stores
        if not self.enabled:
            return
        # Rows after the restored step were never checkpointed: drop them (and a line a crash cut short).
        self._rows = [json.dumps(r) + "\n" for r in read_metrics(workdir, warn=True) if r["step"] <= resume_step]
        write_atomic(self.path, "".join(self._rows))
        if "://" not in str(self.path):
            self._file = self.path.open("a")  # kept open for the run
        if tensorboard:
            self._tb = _summary_writer()(str(workdir / "tensorboard"), purge_step=resume_step + 1)
        if wandb_project:
            try:
                import wandb
            except ModuleNotFoundError as e:
                raise ValueError(f"config.logging.wandb_project={wandb_project!r} needs wandb: "
                                 f"{missing_package_message(e)}.") from None
            self._wandb = wandb.init(project=wandb_project, dir=str(workdir), config=config, resume="allow",
                                     id=workdir.name)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(row) + "\n"
        if self._file is not None:
            self._file.write(line)
            self._file.flush()
        else:
            self._rows.append(line)
        step = row["step"]
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def flush(self) -> None:
        if self.enabled and self._file is None:
            write_atomic(self.path, "".join(self._rows))

    def close(self) -> None:
        self.flush()
        for closer in (self._file, self._tb, self._wandb):
            if closer is not None:
                closer.close() if closer is not self._wandb else closer.finish()


def append_row(workdir: str | epath.PathLike, row: dict[str, Any]) -> None:
    """One more row at the end of WORKDIR/metrics.jsonl (rewritten whole where appending is impossible,
    and where a crash left a partial last line, which is dropped)."""
    path, line = epath.Path(workdir) / "metrics.jsonl", json.dumps(row) + "\n"
    text = path.read_text() if path.exists() else ""
    if "://" in str(path) or (text and not text.endswith("\n")):
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in read_metrics(workdir, warn=True)) + line)
    else:
        with path.open("a") as f:
            f.write(line)


def read_metrics(workdir: str | epath.PathLike, warn: bool = False) -> list[dict[str, Any]]:
    """The rows of WORKDIR/metrics.jsonl. A last line that does not parse is what a crash during a
    write leaves: it is dropped (and said, with `warn`). A bad line before the last is damage that
    no crash makes: a ValueError naming the file and line."""
    path = epath.Path(workdir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            row = None
            if i < len(lines):
                raise ValueError(f"{path}, line {i}: not a JSON object ({line[:60]!r}); fix or remove that "
                                 "line.") from None
            if warn:
                print(f"{path}: dropped a partial last line ({len(line)} characters), as a crash during a write "
                      "leaves.", flush=True)
        if row is not None:
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError(f"{path}, line {i}: a metrics row is a JSON object with an integer 'step'.")
            rows.append(row)
    return rows


def plot_losses(workdir: str | epath.PathLike) -> epath.Path | None:
    """WORKDIR/loss.png: training loss per step and validation loss at each evaluation (a mixture's: each
    source's too); beside it, a preference run's rewards and the harness tasks' scores in [0, 1]
    (accuracies) when the run logged any. None (nothing written) before the first logged step."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = read_metrics(workdir)
    if not any("loss" in r for r in rows):
        return None
    panels = plot_panels(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4), dpi=120, squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        _DRAW[panel](ax, rows)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0, 0].set_title(epath.Path(workdir).name)
    out = epath.Path(workdir) / "loss.png"
    fig.tight_layout()
    with out.open("wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return out


def plot_panels(rows: list[dict[str, Any]]) -> list[str]:
    """The panels of loss.png for these metrics rows: loss, then rewards (preference runs), then tasks."""
    has_rewards = any("rewards/margins" in r for r in rows)
    return ["loss"] + ["rewards"] * has_rewards + ["tasks"] * bool(_task_scores(rows))


def _series(rows: list[dict[str, Any]], key: str) -> tuple[tuple[int, ...], tuple[float, ...]] | None:
    points = [(r["step"], r[key]) for r in rows if key in r]
    return tuple(zip(*points, strict=True)) if points else None


def _draw_loss(ax: Any, rows: list[dict[str, Any]]) -> None:
    ax.plot(*_series(rows, "loss"), label="train", linewidth=1)
    if val := _series(rows, "val_loss"):
        ax.plot(*val, "o-", label="validation", markersize=4)
    for key in sorted({k for r in rows for k in r if k.startswith("val_loss/")}):
        ax.plot(*_series(rows, key), ".--", label=f"validation, {key.split('/', 1)[1]}", linewidth=1)
    preference = any("rewards/margins" in r for r in rows)
    ax.set(xlabel="step", ylabel="loss per pair" if preference else "loss (nats per token)")


def _draw_rewards(ax: Any, rows: list[dict[str, Any]]) -> None:
    """TRL's reward curves: chosen, rejected and margin (beta times the log-ratios to the reference), the
    training steps' as lines and the validation pairs' as markers; accuracies on the right axis."""
    right = ax.twinx()
    for i, name in enumerate(("chosen", "rejected", "margins")):
        colour = f"C{i}"
        if train := _series(rows, f"rewards/{name}"):
            ax.plot(*train, color=colour, linewidth=1, label=name)
        if val := _series(rows, f"val_rewards/{name}"):
            ax.plot(*val, "o--", color=colour, markersize=4, label=f"{name}, validation")
    for key, style in (("rewards/accuracies", "-"), ("val_rewards/accuracies", "o--")):
        if points := _series(rows, key):
            right.plot(*points, style, color="C3", linewidth=1, markersize=4, alpha=0.7)
    right.set(ylim=(0, 1.02), ylabel="accuracy (red)")
    ax.set(xlabel="step", ylabel="reward", title="preference rewards")


def _draw_tasks(ax: Any, rows: list[dict[str, Any]]) -> None:
    for key, points in _task_scores(rows).items():
        ax.plot(*zip(*points, strict=True), "o-", label=key.removeprefix("task/"), markersize=4)
    ax.set(xlabel="step", ylabel="score", title="lm-evaluation-harness tasks")


_DRAW = {"loss": _draw_loss, "rewards": _draw_rewards, "tasks": _draw_tasks}


def _task_scores(rows: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """{task/NAME/METRIC: [(step, value)]} of the task metrics whose every value is in [0, 1] (accuracies,
    exact match; perplexities are left to TensorBoard)."""
    keys = sorted({k for r in rows for k in r if k.startswith("task/")})
    series = {k: [(r["step"], r[k]) for r in rows if k in r] for k in keys}
    return {k: points for k, points in series.items() if all(0.0 <= v <= 1.0 for _, v in points)}


CSV_COLUMNS = ("step", "train_loss", "val_loss", "tokens_per_sec", "elapsed_s")


def write_metrics_csv(workdir: str | epath.PathLike, out: str | epath.PathLike | None = None) -> epath.Path | None:
    """A small CSV of the run (default WORKDIR/metrics.csv), a row per logged or evaluated step:
    step, train loss, validation loss, tokens/s, elapsed seconds (blank where not measured)."""
    by_step: dict[int, dict[str, Any]] = {}
    for r in read_metrics(workdir):
        row = by_step.setdefault(r["step"], {"step": r["step"]})
        row.update({k: v for k, v in (("train_loss", r.get("loss")), ("val_loss", r.get("val_loss")),
                                       ("tokens_per_sec", r.get("tokens_per_sec")), ("elapsed_s", r.get("elapsed_s")))
                    if v is not None})
    if not by_step:
        return None
    out = epath.Path(out) if out else epath.Path(workdir) / "metrics.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, CSV_COLUMNS)
    writer.writeheader()
    for step in sorted(by_step):
        writer.writerow({k: _csv_value(by_step[step].get(k)) for k in CSV_COLUMNS})
    write_atomic(out, text.getvalue())
    return out


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v
