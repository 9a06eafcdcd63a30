"""Accelerator chips and TPU slice topologies: what a layout is measured against.

`CHIPS` holds, per chip, its dense bf16 peak, HBM capacity and bandwidth and interconnect bandwidth
(both directions, all links of one chip: TPU ICI, NVIDIA NVLink), each from the vendor's public page
named in `source`. `chip_for(device.device_kind)` finds a device's entry; `peak_flops_per_device` is
the peak MFU is measured against (the table's, or for a CPU, which publishes none, a matmul measured on it).

`tpu_topology("v5e-16")` (an accelerator type as Cloud TPU names it) or `tpu_topology("v5e:4x4")`
(generation and chip grid) describes a slice; its `devices()` are compile-only TPU devices made by
libtpu on any machine (`pip install -e ".[aot]"`), so a train step can be compiled for a pod from a
laptop and its memory and collectives read off before renting one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_bf16: float  # FLOP/s, dense
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s
    interconnect: float | None  # bytes/s per chip, both directions, all links; None where unpublished
    source: str


CHIPS = {c.name: c for c in (
    Chip("TPU v4", 275e12, 32 * GiB, 1200e9, None, "https://cloud.google.com/tpu/docs/v4"),
    Chip("TPU v5e", 197e12, 16e9, 819e9, 400e9, "https://cloud.google.com/tpu/docs/v5e"),
    Chip("TPU v5p", 459e12, 95e9, 2765e9, 1200e9, "https://cloud.google.com/tpu/docs/v5p-training"),
    Chip("TPU v6e", 918e12, 32e9, 1638e9, 800e9, "https://cloud.google.com/tpu/docs/v6e"),
    Chip("A100", 312e12, 80e9, 2039e9, 600e9, "https://www.nvidia.com/en-us/data-center/a100/ (80 GB SXM)"),
    Chip("H100", 989e12, 80e9, 3350e9, 900e9, "https://www.nvidia.com/en-us/data-center/h100/ (SXM)"),
    Chip("H200", 989e12, 141e9, 4800e9, 900e9, "https://www.nvidia.com/en-us/data-center/h200/ (SXM)"),
)}

# How devices name themselves (`jax.Device.device_kind`) where it differs from the chip's name.
_KIND_ALIASES = {"TPU v5 lite": "TPU v5e", "TPU v6 lite": "TPU v6e", "TPU v5": "TPU v5p"}


def chip_for(device_kind: str) -> Chip | None:
    """The table's entry for a device kind ("TPU v5 lite", "NVIDIA H100 80GB HBM3", ...), else None."""
    kind = device_kind.lower()
    names = {**{a.lower(): c for a, c in _KIND_ALIASES.items()}, **{c.lower(): c for c in CHIPS}}
    for alias in sorted(names, key=len, reverse=True):  # "TPU v5 lite" before "TPU v5"
        if alias in kind:
            return CHIPS[names[alias]]
    return None


# Generation -> (chip, TensorCores counted per chip in accelerator types like v5p-8, grid dimensions).
_GENERATIONS = {"v4": ("TPU v4", 2, 3), "v5p": ("TPU v5p", 2, 3), "v5e": ("TPU v5e", 1, 2),
                "v6e": ("TPU v6e", 1, 2)}
# The usual slice grid for a chip count, from Cloud TPU's tables of supported shapes.
_GRIDS_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_GRIDS_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
             256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}


def lookup_peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s for a `jax.Device.device_kind` (CHIPS), or None when unknown (CPUs)."""
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



@dataclasses.dataclass(frozen=True)
class TpuTopology:
    generation: str
    grid: tuple[int, ...]
    slices: int = 1  # slices joined over the data-center network (multi-slice)

    @property
    def chip(self) -> Chip:
        return CHIPS[_GENERATIONS[self.generation][0]]

    @property
    def chips(self) -> int:
        return math.prod(self.grid) * self.slices

    @property
    def host_bounds(self) -> tuple[int, int, int]:
        """Chips per host along each grid axis: 2x2 (4 chips a host), or the whole slice when smaller."""
        grid = tuple(self.grid) + (1,) * (3 - len(self.grid))
        return tuple(min(g, b) for g, b in zip(grid, (2, 2, 1), strict=True))

    @property
    def name(self) -> str:
        return f"{self.generation}:{'x'.join(map(str, self.grid))}"

    @property
    def label(self) -> str:
        return self.name if self.slices == 1 else f"{self.slices}x{self.name}"

    def devices(self) -> list[Any]:
        """Compile-only devices of this slice (one per chip), from libtpu."""
        # libtpu locks the machine's TPU for one process; compiling for absent chips needs no lock, and
        # without this two sweeps (or two test workers) on one machine would refuse each other.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        try:
            from jax.experimental import topologies

            with _quiet_stderr():
                desc = topologies.get_topology_desc(
                    platform="tpu", topology_name=self.name,
                    chip_config_name="megacore" if _GENERATIONS[self.generation][1] == 2 else "default",
                    chips_per_host_bounds=self.host_bounds, wrap=(False,) * 3, num_slices=self.slices)
        except Exception as e:  # noqa: BLE001 (libtpu missing, or a grid it refuses)
            raise ValueError(f"--topology={self.name}: no TPU compiler to describe it ({str(e).splitlines()[0][:150]}"
                             "); install it with pip install -e \".[aot]\".") from None
        return list(desc.devices)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the process's stderr (file descriptor 2) for a while: on a machine without a TPU, libtpu
    logs that it cannot find the absent TPU VM's metadata (hostnames, accelerator type), which is
    expected when compiling for absent chips. Errors still arrive as exceptions."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def tpu_topology(name: str) -> TpuTopology:
    """'v5e-16' (Cloud TPU accelerator type: chips for v5e/v6e, TensorCores for v4/v5p) or 'v5e:4x4'; with
    an 'Nx' in front ('2xv5e-16'), N such slices joined over the data-center network."""
    known = ", ".join(_GENERATIONS)
    many = re.fullmatch(r"(\d+)x(v.+)", name.strip())
    if many:
        return dataclasses.replace(tpu_topology(many.group(2)), slices=int(many.group(1)))
    m = re.fullmatch(r"(v\w+?)(?:-(\d+)|:(\d+(?:x\d+)+))", name.strip())
    if not m or m.group(1) not in _GENERATIONS:
        raise ValueError(f"--topology={name!r} is not a TPU slice like v5e-16 or v5e:4x4 (generations: {known}); "
                         "--topology=list shows the table.")
    generation, count, grid = m.groups()
    _, cores_per_chip, ndim = _GENERATIONS[generation]
    if grid:
        dims = tuple(int(d) for d in grid.split("x"))
        if len(dims) != ndim:
            raise ValueError(f"--topology={name!r}: {generation} slices are {ndim}-dimensional grids.")
        return TpuTopology(generation, dims)
    chips = int(count) // cores_per_chip
    grids = _GRIDS_2D if ndim == 2 else _GRIDS_3D
    if chips not in grids:
        raise ValueError(f"--topology={name!r}: no usual {generation} slice of {chips} chips; give the grid, "
                         f"e.g. {generation}:{'x'.join(map(str, next(iter(grids.values()))))}.")
    return TpuTopology(generation, grids[chips])


def topology_table() -> str:
    """The chip table as text (what --topology=list prints)."""
    rows = [f"{'chip':<9} {'bf16 TFLOP/s':>12} {'HBM GB':>7} {'HBM GB/s':>9} {'links GB/s':>10}  source"]
    for c in CHIPS.values():
        link = f"{c.interconnect / 1e9:,.0f}" if c.interconnect else "n/a"
        rows.append(f"{c.name:<9} {c.peak_bf16 / 1e12:>12,.0f} {c.hbm_bytes / 1e9:>7,.1f} "
                    f"{c.hbm_bandwidth / 1e9:>9,.0f} {link:>10}  {c.source}")
    rows.append("TPU slices: v4-8 ... v4-8192 and v5p-8 ... (TensorCores, 2 per chip), v5e-1 ... v5e-256 and "
                "v6e-1 ... v6e-256 (chips), or generation:grid such as v5e:4x4, v5p:2x2x4.")
    return "\n".join(rows)
