"""What a chip achieves in practice and what it costs to rent, each figure with its public source and date:
what a sweep's estimates and prices rest on (perf/estimate.py). The physical figures (peak, HBM, ICI) are
runtime/hardware.py's.

- `mfu`: the model FLOPs utilization the best published training runs reach on the chip (MaxText's
  tables for TPUs; lightjax's own H100 runs). A sweep's compute time is the compiled work at this range
  of the peak, so no estimate predicts more than the best published runs reached.
- `dcn`: data-center-network bandwidth per chip (bytes/s), what crosses slices in a multi-slice job: the
  per-host NIC configuration over the host's chips.
- prices: US dollars per chip-hour, on-demand list prices, us-central regions. Spot prices are not held:
  Google sets them per region and revises them as often as every 30 days, so a stored one would mislead;
  a sweep takes the rate you pay with `--chip_hour_price` (Spot, committed use, another region).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Practice:
    mfu: tuple[float, float]
    mfu_source: str
    on_demand: float | None = None  # $ per chip-hour
    price_source: str = ""
    dcn: float | None = None  # bytes/s per chip
    dcn_source: str = ""


_TPU_PRICES = "https://cloud.google.com/tpu/pricing, us-central, recorded 2026-11 (docs/tpu.md)"

PRACTICE = {
    "TPU v5e": Practice((0.55, 0.67), "MaxText/configs/v5e/README.md: 16B-128B models on v5e-256, 56-67% MFU",
                        1.20, _TPU_PRICES, 2 * 100e9 / 8 / 8,
                        "https://cloud.google.com/tpu/docs/v6e (v5e column): 2 x 100 Gbps NIC per 8-chip host"),
    "TPU v5p": Practice((0.64, 0.71), "MaxText runtime performance results: 32B-1160B on v5p-128 to v5p-7680, "
                        "64-71% MFU", 4.20, _TPU_PRICES),
    "TPU v6e": Practice((0.44, 0.50), "MaxText docs/reference/models/tiering.md: Trillium gold recipes (Llama 2 70B "
                        "43.8%, Llama 3.1 8B 45.5%, Llama 3.1 70B 50.3%)", 2.70, _TPU_PRICES,
                        4 * 200e9 / 8 / 8, "https://cloud.google.com/tpu/docs/v6e: 4 x 200 Gbps NIC per 8-chip host"),
    "TPU v4": Practice((0.40, 0.60), "no published table here: a wide range", 3.22, _TPU_PRICES),
    "H100": Practice((0.42, 0.53), "lightjax's own runs on one H100 (docs/benchmarks.md: Llama-3.2-1B 42-52%)",
                     2.69, "RunPod's H100 on-demand rate, via deploybase.ai (2026)"),
    "H200": Practice((0.46, 0.54), "lightjax's own runs on one H200 (docs/benchmarks.md: Llama-3.2-1B 46-54%)"),
}
# CPUs publish no peak: a sweep measures one (a matmul), and lightjax's CPU runs reach 45-75% of it.
CPU = Practice((0.45, 0.75), "lightjax's CPU runs (docs/benchmarks.md: 45-75% of the measured matmul peak)")


def practice_for(chip_name: str | None, platform: str) -> Practice | None:
    """The practice figures of a chip (runtime/hardware.py's name), CPU's for a CPU, else None."""
    if platform == "cpu":
        return CPU
    return PRACTICE.get(chip_name or "")
