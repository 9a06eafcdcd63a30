"""What a compiled layout will cost: its FLOPs counted three ways, a step-time range, and a price per token.

FLOPs per device and step:
- model: what MFU counts (model/flops.py: 6N + causal attention);
- work: what the compiled step computes, analytically: the full attention square for XLA's and the
  einsum kernels (half for the blockwise ones, splash and cuDNN), plus the forward matmuls the remat
  policy recomputes (model/flops.py work_flops_per_token);
- XLA: the compiler's own count, loop-corrected (runtime/hlo.py). It is shown, not used: it cannot see
  inside a custom call (the splash kernel's attention), and a count read from a program's text misses
  any matmul form the reader does not know. A row whose XLA count differs from the work by more than 15%
  is flagged.

The step time is a range, not a point: the work at the chip's published MFU range (perf/costs.py: the
best published runs, which absorb their own recompute, so the range is conservative), and the
collectives' bytes over ICI, and across slices over the data-center network, each at its bandwidth;
the fast end overlaps communication with compute entirely, the slow end not at all. It leaves out host
input, stragglers, the compiler's choices of fusion and layout, and memory bandwidth limits of small
matmuls: a layout whose work is small next to its weights reads runs slower than either end.
"""

from __future__ import annotations

from typing import Any

from lightjax.model.flops import causal_keys, flops_per_token, work_flops_per_token
from lightjax.perf.costs import Practice

FLAG_RATIO = 0.15  # XLA's count off the analytic work by more than this: the row says so


def flop_counts(cfg: Any, seq_len: int, tokens_per_device: float, remat: str, kernel: str,
                xla_flops: float | None) -> dict[str, Any]:
    """model / work / XLA FLOPs per device and step, and a flag (the likely causes) when XLA's count is off."""
    model = flops_per_token(cfg, seq_len, causal_keys(seq_len)) * tokens_per_device
    work = work_flops_per_token(cfg, seq_len, remat, blockwise=kernel in ("splash", "cudnn")) * tokens_per_device
    out = {"model_flops_per_device": model, "work_flops_per_device": work, "xla_flops_per_device": xla_flops,
           "flops_flag": ""}
    if xla_flops:
        ratio = xla_flops / work
        if ratio < 1 - FLAG_RATIO:
            out["flops_flag"] = f"XLA counts {ratio:.2f} of the work: " + (
                "the splash kernel's attention is a custom call it does not count" if kernel == "splash"
                else "a matmul form its count misses")
        elif ratio > 1 + FLAG_RATIO:
            out["flops_flag"] = (f"XLA counts {ratio:.2f} of the work: "
                                 + ("the loop correction counts the recomputed forward pass again" if remat != "none"
                                    else "a loop counted twice, or work beyond the model's"))
    return out


def step_range(work: float, model: float, peak: float, practice: Practice | None, ici_bytes: float,
               ici: float | None, dcn_bytes: float = 0.0) -> dict[str, Any]:
    """(fastest, slowest) step seconds and the MFU each gives, from the work at the chip's published MFU
    range and the collectives over ICI (and DCN), overlapped fully (fast) or not at all (slow)."""
    low, high = practice.mfu if practice else (0.4, 0.6)
    comm = (ici_bytes / ici if ici else 0.0) + (dcn_bytes / practice.dcn if practice and practice.dcn else 0.0)
    fast = max(work / (peak * high), comm)
    slow = work / (peak * low) + comm
    return {"compute_s": (work / (peak * high), work / (peak * low)), "collective_s": comm,
            "step_s": (fast, slow), "mfu": (model / (peak * slow), model / (peak * fast)),
            "efficiency_source": practice.mfu_source if practice else "no published figure: 40-60% assumed"}


def prices(tokens_per_step: int, chips: int, step_s: tuple[float, float], practice: Practice | None,
           train_tokens: float = 0.0, chip_hour_price: float | None = None) -> dict[str, Any]:
    """Tokens/s per chip, $ per million tokens and days to train `train_tokens`, each as a (best, worst)
    range over the step range. Priced at `chip_hour_price` when given (a Spot, committed-use or other
    region's rate), else at the chip's on-demand list price; no price where the chip has none."""
    per_chip = tuple(tokens_per_step / s / chips for s in step_s)
    out: dict[str, Any] = {"tokens_per_s_per_chip": per_chip}
    if train_tokens:
        out["days"] = tuple(train_tokens / (t * chips) / 86400 for t in per_chip)
    if chip_hour_price is not None:
        rate, basis = chip_hour_price, "given with --chip_hour_price"
    elif practice is not None and practice.on_demand is not None:
        rate, basis = practice.on_demand, f"on-demand, {practice.price_source}"
    else:
        return out
    out["usd_per_million_tokens"] = tuple(rate / 3600 / t * 1e6 for t in per_chip)
    out["price"] = f"${rate:.2f}/chip-hour ({basis})"
    return out
