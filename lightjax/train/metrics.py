"""Model FLOPs, peak FLOP/s per device kind, and MFU.

FLOPs per token of one training step (forward + backward), as nanoGPT and the PaLM paper count them:

    6 * N  +  12 * n_layer * n_head * head_size * T

- 6N: each parameter used in a matmul costs 2 FLOPs per token forward and 4 backward. N counts the
  matmul parameters: everything except the input embedding table (a lookup, not a matmul) unless
  the table is tied to the output head, where it is used in a matmul once. Norms and biases are
  included, as nanoGPT includes them; they are a rounding error. In a mixture of experts N counts
  the experts a token uses (n_expert_per_token of n_expert), as MoE papers do.
- 12 L H Q T: attention scores (QK^T) and the weighted sum (AV), 2 * 2 * T * H * Q FLOPs per token
  and layer forward, times 3 for forward + backward. Causal masking is ignored (as in PaLM), so this
  counts the full T x T square.

MFU = achieved model FLOP/s / (peak FLOP/s per device * devices). Rematerialisation does not count:
recomputed FLOPs are the hardware's cost, not the model's.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath

from lightjax.model.config import ModelConfig
from lightjax.model.gpt import abstract_params, count_params
from lightjax.runtime.files import write_atomic
from lightjax.runtime.hardware import chip_for
from lightjax.runtime.hlo import loop_corrected_flops
from lightjax.runtime.packages import missing_package_message


def matmul_params(cfg: ModelConfig) -> int:
    """N in 6N: parameters that take part in matmuls (see module docstring)."""
    n = count_params(abstract_params(cfg))
    if cfg.n_expert:  # a token uses n_expert_per_token experts (lightjax computes all: see mlp.LLaMAMoE)
        n -= (cfg.n_expert - cfg.n_expert_per_token) * 3 * cfg.n_embd * cfg.moe_intermediate_size * cfg.n_layer
    return n if cfg.tie_embeddings else n - cfg.padded_vocab_size * cfg.n_embd


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length `seq_len`: 2 per weight forward,
    4 backward (gradients of the input and of the weight); LoRA's frozen weights get no weight gradient."""
    per_weight = 4 if cfg.lora_r else 6
    return per_weight * matmul_params(cfg) + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * seq_len


def lookup_peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s for a `jax.Device.device_kind` (hardware.CHIPS), or None when unknown (CPUs)."""
    chip = chip_for(device_kind)
    return chip.peak_bf16 if chip else None


@functools.lru_cache
def measure_matmul_flops(n: int = 2048, dtype: Any = jnp.float32, repeats: int = 5,
                         device: jax.Device | None = None) -> float:
    """Best-of-`repeats` FLOP/s of an n x n x n matmul on one device: a practical peak for CPUs,
    which publish none."""
    device = device or jax.local_devices()[0]  # jax.devices()[0] may belong to another process
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def peak_flops_per_device(configured: float = 0.0, dtype: Any = jnp.float32,
                          device: jax.Device | None = None) -> tuple[float, str]:
    """(peak FLOP/s per device, where the figure came from): the config value when set, else the
    table for the kind of `device` (default: this process's first; pass a mesh's own device, which may
    be a compile-only TPU), else a matmul measurement on it (CPU)."""
    if configured > 0:
        return configured, "config"
    device = device or jax.local_devices()[0]
    table = lookup_peak_flops(device.device_kind)
    if table is not None:
        return table, f"table ({device.device_kind}, bf16)"
    # Simulated CPU devices share the same cores: measure one, then split it between them.
    per_device = (measure_matmul_flops(dtype=dtype, device=device)
                  / (jax.local_device_count() if device.platform == "cpu" else 1))
    return per_device, f"measured ({device.device_kind} matmul, {jnp.dtype(dtype).name})"


def mfu(tokens_per_sec: float, flops_per_tok: float, peak_per_device: float, n_devices: int) -> float:
    return tokens_per_sec * flops_per_tok / (peak_per_device * n_devices)


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs of one call of a compiled function (one device's share), from XLA's cost analysis with the
    matmuls of loop bodies counted once per iteration (hlo.loop_corrected_flops; XLA counts a scanned
    layer stack once). None if the backend has no cost analysis."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 (some backends do not implement it)
        return None
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return loop_corrected_flops(compiled.as_text(), float(flops)) if flops else None


# ------------------------------------------------------------------------------------------------
# Writers: metrics.jsonl (always), TensorBoard (no TensorFlow needed), Weights & Biases (optional).
# ------------------------------------------------------------------------------------------------


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
    """WORKDIR/loss.png: training loss per step and validation loss at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = read_metrics(workdir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(*zip(*train, strict=True), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(epath.Path(workdir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = epath.Path(workdir) / "loss.png"
    fig.tight_layout()
    with out.open("wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return out


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
    out.write_text(text.getvalue())
    return out


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v
