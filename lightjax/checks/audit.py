"""The reproducibility audit: the same config trained twice with its seed and once with another
(`determinism_check`), and a record of everything else the numbers depend on (`environment`).
`scripts/reproducibility_audit.py` is a thin command line over these.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax

from lightjax.train.metrics import read_metrics
from lightjax.train.trainer import train


def _train_losses(config: Any, workdir: Path) -> tuple[list[float], float]:
    """(train loss at every step, final loss) of a fresh run; the final loss is the last validation
    loss when the run evaluates (less noisy than one batch), else the last train loss."""
    with contextlib.redirect_stdout(io.StringIO()):  # the audit prints its own summary
        train(config, workdir)
    rows = read_metrics(workdir)
    losses = [r["loss"] for r in rows if "loss" in r]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    return losses, (vals[-1] if vals else losses[-1])


def determinism_check(config: Any, second_seed: int | None = None, tolerance: float = 0.01,
                      workdir: str | Path | None = None) -> dict[str, Any]:
    """Run the config twice with its seed and once with another: the first two loss sequences must be
    identical, the third's final loss within `tolerance` (relative) of the first's."""
    config = copy.deepcopy(config)
    with config.unlocked():
        config.train.log_every = 1  # compare the loss of every step
        config.checkpoint.resume = "never"
        config.logging.progress = False
        config.logging.tensorboard = False
        config.logging.wandb_project = ""
    seed = config.train.seed
    second_seed = seed + 1 if second_seed is None else second_seed
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        runs = {}
        for name, s in (("seed_a", seed), ("seed_a_again", seed), ("seed_b", second_seed)):
            c = copy.deepcopy(config)
            c.train.seed = s
            start = time.perf_counter()
            losses, final = _train_losses(c, Path(tmp) / name)
            runs[name] = {"seed": s, "steps": len(losses), "final_loss": final, "seconds": time.perf_counter() - start,
                          "losses": losses}
    a, again, b = runs["seed_a"], runs["seed_a_again"], runs["seed_b"]
    diffs = [abs(x - y) for x, y in zip(a["losses"], again["losses"], strict=False)]
    identical = a["losses"] == again["losses"]
    relative = abs(b["final_loss"] - a["final_loss"]) / abs(a["final_loss"])
    return {"same_seed_identical": identical, "same_seed_max_abs_diff": max(diffs, default=0.0),
            "seed_relative_diff": relative, "seed_tolerance": tolerance, "seed_within_tolerance": relative <= tolerance,
            "passed": identical and relative <= tolerance, "runs": runs}


# --- The reproducibility audit's record of the environment -------------------------------------------

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorflow-datasets", "sentencepiece",
            "numpy", "ml-collections")
# Environment variables that change what XLA compiles, which devices it sees or how numbers come out.
ENV_PREFIXES = ("XLA_", "JAX_", "TPU_", "LIBTPU", "CUDA_", "NCCL_", "TF_CPP_", "OMP_", "MKL_", "PYTHONHASHSEED")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def config_digest(config: Any) -> tuple[dict[str, Any], str]:
    """(the config as plain JSON, sha256 of its canonical form)."""
    as_dict = json.loads(config.to_json_best_effort())
    canonical = json.dumps(as_dict, sort_keys=True, separators=(",", ":"))
    return as_dict, hashlib.sha256(canonical.encode()).hexdigest()


def environment(config: Any) -> dict[str, Any]:
    """What a run's numbers depend on besides its config: software, hardware, flags, code version."""
    devices = jax.devices()
    kinds: dict[str, int] = {}
    for d in devices:
        kinds[d.device_kind] = kinds.get(d.device_kind, 0) + 1
    status = _git("status", "--porcelain")
    config_dict, digest = config_digest(config)
    return {
        "python": sys.version.split()[0],
        "packages": {p: _version(p) for p in PACKAGES},
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "backend": jax.default_backend(),
        "device_count": len(devices),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "device_kinds": kinds,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "config_sha256": digest,
        "config": config_dict,
    }


def audit_markdown(report: dict[str, Any]) -> str:
    """environment.md: the same facts as environment.json, for people."""
    env = report["environment"]
    lines = ["# Reproducibility audit", "", "## Environment", "", "| item | value |", "|---|---|"]
    items = [("Python", env["python"]), *[(p, v or "not installed") for p, v in env["packages"].items()],
             ("platform", env["platform"]), ("CPU", f"{env['cpu_model']} ({env['cpu_count']} cores)"),
             ("backend", env["backend"]),
             ("devices", ", ".join(f"{n} x {k}" for k, n in env["device_kinds"].items())
              + f" ({env['process_count']} process(es))"),
             ("XLA_FLAGS", f"`{env['xla_flags']}`" if env["xla_flags"] else "(unset)"),
             ("git commit", f"{env['git_commit']}{' (dirty tree)' if env['git_dirty'] else ''}"),
             ("config sha256", env["config_sha256"])]
    lines += [f"| {k} | {v} |" for k, v in items]
    lines += ["", "Environment variables: " + (", ".join(f"`{k}={v}`" for k, v in env["env"].items()) or "none set")]
    check = report.get("determinism")
    if check:
        runs = check["runs"]
        lines += ["", "## Determinism", "",
                  "| run | seed | steps | final loss | seconds |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {r['seed']} | {r['steps']} | {r['final_loss']:.6f} | {r['seconds']:.1f} |"
                  for name, r in runs.items()]
        lines += ["", f"- Same seed twice, loss of every step identical: **{check['same_seed_identical']}** "
                  f"(largest difference {check['same_seed_max_abs_diff']:.3g})",
                  f"- Second seed's final loss within {check['seed_tolerance']:.0%} of the first's: "
                  f"**{check['seed_within_tolerance']}** ({check['seed_relative_diff']:.2%} apart)",
                  f"- Verdict: **{'PASS' if check['passed'] else 'FAIL'}**"]
    lines += ["", "## Config", "", "```json", json.dumps(env["config"], indent=1, sort_keys=True), "```", ""]
    return "\n".join(lines)
