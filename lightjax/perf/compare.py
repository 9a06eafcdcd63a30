"""Which slice to rent: one run config and global batch compiled on several TPU slices (a few layouts each),
and for each slice the layout that fits and costs least per token, best slice first.

The layouts tried on a slice of n chips: FSDP over all (1, n, 1), FSDP with tensor parallelism 2 and 4
where the model's heads allow, and data parallelism 2 over FSDP (2, n/2, 1). Cost per token is the slow
end of the estimate's range (perf/estimate.py) at the chip's on-demand price (or the one rate given); a
slice without a price is ranked by tokens/s per chip.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightjax.perf.sweep import Setting, cost_text, gib, span, sweep
from lightjax.runtime.hardware import tpu_topology
from lightjax.train.config import resolve_model_config


def candidate_layouts(chips: int, n_head: int, n_query_groups: int) -> list[tuple[int, int, int]]:
    """(data, fsdp, tensor) layouts worth compiling on `chips` chips."""
    out = [(1, chips, 1)]
    out += [(1, chips // tp, tp) for tp in (2, 4)
            if chips % tp == 0 and chips > tp and n_head % tp == 0 and n_query_groups % tp == 0]
    if chips % 2 == 0 and chips > 2:
        out.append((2, chips // 2, 1))
    return out


def _cost(row: dict[str, Any]) -> float:
    usd = row.get("usd_per_million_tokens")
    return max(usd) if usd else 1.0 / min(row["tokens_per_s_per_chip"])


def compare(config: Any, topologies: list[str], batch: int, train_tokens: float = 0.0,
            log: Callable[[str], None] | None = None, chip_hour_price: float | None = None) -> list[dict[str, Any]]:
    """One summary per slice, cheapest first: its best layout's row (or why none fits) with `topology`."""
    cfg = resolve_model_config(config)
    summaries = []
    for name in topologies:
        topology = tpu_topology(name)
        layouts = candidate_layouts(topology.chips, cfg.n_head, cfg.n_query_groups)
        rows = sweep(config, [Setting(m, "", "", batch) for m in layouts], topology.devices(), log=log,
                     train_tokens=train_tokens, chip_hour_price=chip_hour_price)
        fitting = [r for r in rows if "error" not in r]
        best = min(fitting, key=_cost) if fitting else {"error": "no layout fits: " + "; ".join(
            f"{r['setting']}: {r['error'][:80]}" for r in rows)}
        summaries.append({"topology": topology.label, "chips": topology.chips, **best})
    return sorted(summaries, key=lambda s: (_cost(s) if "error" not in s else float("inf")))


def compare_lines(summaries: list[dict[str, Any]]) -> str:
    """One line per slice: the best layout, its memory, step and MFU ranges, tokens/s per chip, cost."""
    lines = []
    for s in summaries:
        if "error" in s:
            lines.append(f"{s['topology']} ({s['chips']} chips): {s['error']}")
            continue
        days = f", {span(s['days'], '{:.1f}')} days" if "days" in s else ""
        lines.append(f"{s['topology']} ({s['chips']} chips): {s['setting']}, {gib(s['total_bytes'])}/chip, "
                     f"{span([1e3 * x for x in s['estimated_step_s']])} ms/step, MFU "
                     f"{span([100 * x for x in s['estimated_mfu']])}%, "
                     f"{span(s['tokens_per_s_per_chip'], '{:,.0f}')} tok/s/chip, "
                     f"{cost_text(s) or 'no price'} per 1M tokens{days}")
    return "\n".join(lines)
