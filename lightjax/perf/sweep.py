"""Sharding sweeps: compile one run config under many layouts and compare what each would cost.

A setting is a mesh shape (data, fsdp, tensor), a rule set, a remat policy and a global batch. For
each, the real train step is compiled with abstract inputs for the given devices (local ones, or a
TPU slice's compile-only devices from `hardware.tpu_topology`), and one row records:

- memory per device from the compiled program: its peak, and its arguments, outputs and temporaries
  (not all live at once), beside the HBM the TPU compiler allows a program (usable_hbm). Whether it fits is the
  compiler's verdict alone: a setting it refuses for lack of memory is a row that does not fit, with its
  message, and one it compiles fits;
- FLOPs per device three ways (model, the compiled step's analytic work, XLA's count), flagged where
  XLA's count is off the work (perf/estimate.py);
- collectives per step by kind, count and bytes (hlo.collectives, from the partitioned program), those
  whose device groups span slices counted apart as data-center-network bytes;
- the estimated step time as a range, its MFU range, tokens/s per chip and the price per million tokens
  (perf/estimate.py, perf/costs.py);
- on local devices, the measured step time and its MFU beside the estimate: a calibration point.

A setting that fails validation or compilation is a row with its reason; the sweep goes on.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import re
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lightjax.model.gpt import REMAT_POLICIES
from lightjax.perf.benchmark import synthetic_inputs
from lightjax.perf.costs import practice_for
from lightjax.perf.estimate import flop_counts, prices, step_range
from lightjax.runtime.hardware import chip_for, peak_flops_per_device
from lightjax.runtime.hlo import COLLECTIVES, collectives, compiled_flops, partitioned_text
from lightjax.runtime.sharding import RULE_SETS, batch_sharding
from lightjax.train.run import build_run

# Bytes each device moves over its links per byte of the combined tensor, for ring algorithms.
_LINK_FACTOR = {"all-gather": 1.0, "reduce-scatter": 1.0, "all-reduce": 2.0, "all-to-all": 1.0,
                "collective-permute": 1.0}


@dataclasses.dataclass(frozen=True)
class Setting:
    mesh: tuple[int, int, int]  # data, fsdp, tensor
    rules: str  # "": the config's
    remat: str  # "": the config's
    batch: int  # 0: the config's global batch size


def settings(layouts: str, rules: str = "", remat: str = "", batches: str = "",
             device_count: int | None = None) -> list[Setting]:
    """Every combination of 'data,fsdp,tensor' layouts separated by ':', and comma-separated rule sets,
    remat policies and global batch sizes (each left empty: the config's own). A value that cannot work
    (a layout whose product is not `device_count`, an unknown rule set or remat policy, a batch below 1)
    is a ValueError naming it, before anything is compiled."""
    try:
        meshes = [tuple(int(x) for x in layout.split(",")) for layout in layouts.split(":") if layout]
        sizes = [int(b) for b in batches.split(",") if b] or [0]
    except ValueError:
        raise ValueError(f"--layouts={layouts!r} / --batch={batches!r}: layouts are 'data,fsdp,tensor' separated "
                         "by ':', batches comma-separated integers.") from None
    if not meshes or any(len(m) != 3 or min(m) < 1 for m in meshes):
        raise ValueError(f"--layouts={layouts!r}: give 'data,fsdp,tensor' settings of positive sizes separated by "
                         "':', e.g. 4,1,1:1,4,1.")
    wrong = [m for m in meshes if device_count is not None and math.prod(m) != device_count]
    if wrong:
        raise ValueError(f"--layouts: {', '.join(','.join(map(str, m)) for m in wrong)} "
                         f"{'does' if len(wrong) == 1 else 'do'} not use the {device_count} devices (the sizes' "
                         "product must equal the device count).")
    bad = [b for b in sizes if b < 0 or (b == 0 and batches)]
    if bad:
        raise ValueError(f"--batch={batches!r}: global batch sizes must be positive (got {bad[0]}).")
    unknown_rules = [r for r in rules.split(",") if r and r not in RULE_SETS]
    unknown_remat = [r for r in remat.split(",") if r and r not in REMAT_POLICIES]
    if unknown_rules:
        raise ValueError(f"--rules: {unknown_rules[0]!r} is not one of {', '.join(RULE_SETS)}.")
    if unknown_remat:
        raise ValueError(f"--remat: {unknown_remat[0]!r} is not one of {', '.join(REMAT_POLICIES)}.")
    return [Setting(m, r, p, b) for m, r, p, b in itertools.product(
        meshes, rules.split(","), remat.split(","), sizes)]


def failed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows whose setting failed for another reason than not fitting in memory (which is a result)."""
    return [r for r in rows if "error" in r and r.get("fits") is not False]


def _configure(config: Any, setting: Setting) -> Any:
    c = copy.deepcopy(config)
    with c.unlocked():
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = setting.mesh
        c.mesh.rules = setting.rules or c.mesh.rules
        c.train.remat = setting.remat or c.train.remat
        if setting.batch:
            c.train.global_batch_size = setting.batch
    return c


_USABLE_HBM = re.compile(r"available HBM \(([\d.]+)G\)")
_usable: dict[str, float | None] = {}


def usable_hbm(device: Any) -> float | None:
    """The HBM (bytes) the TPU compiler lets one program use on this device's chip, as the compiler itself
    states it when it refuses a program larger than any chip (15.75 GiB of a v5e's 16 GiB); None off TPUs."""
    if device.platform != "tpu":
        return None
    if device.device_kind not in _usable:
        too_big = jax.ShapeDtypeStruct((2**38,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(device))
        try:
            jax.jit(lambda x: x + 1).lower(too_big).compile()
            found = None
        except Exception as e:  # noqa: BLE001 (the refusal is the answer)
            match = _USABLE_HBM.search(str(e))
            found = float(match.group(1)) * 2**30 if match else None
        chip = chip_for(device.device_kind)
        _usable[device.device_kind] = found or (chip.hbm_bytes if chip else None)
    return _usable[device.device_kind]


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        if "RESOURCE_EXHAUSTED" in line or "exceeds" in line:
            return line.strip()[:300]
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def run_setting(config: Any, setting: Setting, devices: list[Any], measure_steps: int = 0,
                train_tokens: float = 0.0, chip_hour_price: float | None = None) -> dict[str, Any]:
    """One row of a sweep (see the module docstring)."""
    c = _configure(config, setting)
    seq = c.data.seq_len
    batch, rules, remat = c.train.global_batch_size, c.mesh.rules, c.train.remat
    row: dict[str, Any] = {
        "setting": f"{'x'.join(map(str, setting.mesh))} {rules} remat={remat} batch={batch}",
        "mesh": dict(zip(("data", "fsdp", "tensor"), setting.mesh, strict=True)), "rules": rules,
        "remat": remat, "global_batch_size": batch}
    device = devices[0]
    chip = chip_for(device.device_kind)
    row.update(device_kind=device.device_kind, devices=len(devices), hbm_bytes=usable_hbm(device))
    try:
        run = build_run(c, devices)
        state = run.abstract_state
        if run.needs_reference:  # full preference tuning holds the frozen reference beside the state
            run = run.with_reference(state.params)
        sharding = batch_sharding(run.mesh)
        rows = {"tokens": jax.ShapeDtypeStruct((batch, seq + 1), np.int32, sharding=sharding),
                **{k: jax.ShapeDtypeStruct((batch, seq), np.int32, sharding=sharding)
                   for k in _row_inputs(c.data.document_mask, run.preference)}}
        start = time.perf_counter()
        compiled, text = partitioned_text(run.train_step.lower(state, rows))
        row["compile_s"] = time.perf_counter() - start
    except Exception as e:  # noqa: BLE001 (a setting that cannot work is a row, and the sweep goes on)
        row.update(fits=False if "RESOURCE_EXHAUSTED" in str(e) else None, error=_first_line(e))
        return row
    memory = compiled.memory_analysis()
    buffers = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes \
        - memory.alias_size_in_bytes
    # The peak is what the TPU compiler holds against its HBM: not every temporary is live at once, so it can be
    # well below the buffers' sum.
    peak = getattr(memory, "peak_memory_in_bytes", 0) or buffers
    # Fits: the compiler's verdict for a TPU (it refuses a program over its usable HBM); unknown elsewhere.
    row.update(argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
               temp_bytes=memory.temp_size_in_bytes, buffer_bytes=buffers, total_bytes=peak,
               fits=True if device.platform == "tpu" else None, attention=run.model.attention)
    slices = [getattr(d, "slice_index", 0) for d in run.mesh.devices.flat]  # partition ids follow the mesh
    row.update(flop_counts(run.model.config, seq, batch * seq / len(devices), c.train.remat, run.model.attention,
                           compiled_flops(compiled)),
               collectives=collectives(text, slices if len(set(slices)) > 1 else None))
    row.update(_estimate(row, c, device, chip, train_tokens, chip_hour_price))
    if measure_steps:  # real devices only: compile-only ones cannot run
        row.update(_measure(run, compiled, c, measure_steps, row["model_flops_per_device"], row["peak_flops"]))
    return row


def _row_inputs(document_mask: bool, preference: bool) -> tuple[str, ...]:
    """The [B, seq] arrays of a training batch beside its tokens, as the run's rows hold them."""
    if preference:  # a chosen/rejected pair per row, each side its own document (data/preferences.py)
        return "chosen_mask", "rejected_mask", "segment_ids", "positions"
    return ("mask", "segment_ids", "positions") if document_mask else ("mask",)


def _estimate(row: dict[str, Any], config: Any, device: Any, chip: Any, train_tokens: float,
              chip_hour_price: float | None) -> dict[str, Any]:
    """The step-time range, its MFU range and its prices (perf/estimate.py)."""
    peak, source = peak_flops_per_device(config.train.peak_flops, device=device)
    practice = practice_for(chip.name if chip else None, device.platform)
    col = row["collectives"]
    ici_bytes = sum(_LINK_FACTOR[k] * (col[k]["bytes"] - col[k]["dcn_bytes"]) for k in COLLECTIVES)
    dcn_bytes = sum(_LINK_FACTOR[k] * col[k]["dcn_bytes"] for k in COLLECTIVES)
    link = chip.interconnect if chip else None
    est = step_range(row["work_flops_per_device"], row["model_flops_per_device"], peak, practice, ici_bytes, link,
                     dcn_bytes)
    tokens = row["global_batch_size"] * config.data.seq_len
    costs = prices(tokens, row["devices"], est["step_s"], practice, train_tokens, chip_hour_price)
    return {"peak_flops": peak, "peak_source": source, "interconnect": link, "dcn_bytes": dcn_bytes,
            **{f"estimated_{k}": v for k, v in est.items()}, **costs}


def _measure(run: Any, compiled: Any, config: Any, steps: int, model_flops: float,
             peak: float) -> dict[str, Any]:
    """Median step time of the compiled step on real devices, synthetic batches, after one warm-up."""
    state, batch = synthetic_inputs(run, config, config.data.document_mask)
    reference = (jax.tree.map(jnp.copy, state.params),) if run.needs_reference else ()
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, *reference)
        jax.block_until_ready(metrics)
        if i:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    return {"measured_step_s": step_s, "measured_mfu": model_flops / (peak * step_s)}


def sweep(config: Any, all_settings: list[Setting], devices: list[Any], measure_steps: int = 0,
          log: Any = None, train_tokens: float = 0.0, chip_hour_price: float | None = None) -> list[dict[str, Any]]:
    rows = []
    for s in all_settings:
        rows.append(run_setting(config, s, devices, measure_steps, train_tokens, chip_hour_price))
        if log:
            log(format_row(rows[-1]))
    return rows


def gib(b: float | None) -> str:
    """Bytes in GiB (MiB below one GiB): the one unit of every memory figure."""
    if b is None:
        return ""
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f}" if seconds >= 1e-3 else f"{1e3 * seconds:.3g}"


def span(values: tuple[float, float], fmt: str = "{:.1f}") -> str:
    low, high = sorted(values)
    return fmt.format(low) + "-" + fmt.format(high)


def _flops(r: dict[str, Any]) -> str:
    xla = r["xla_flops_per_device"]
    counts = [r["model_flops_per_device"], r["work_flops_per_device"]] + ([xla] if xla else [])
    return " / ".join(f"{x / 1e12:.2f}" for x in counts) + (" [!]" if r["flops_flag"] else "")


def _dcn(r: dict[str, Any]) -> str:
    dcn = sum(v["dcn_bytes"] for v in r["collectives"].values())
    return f" ({dcn / 1e9:.3f} GB over the data-center network)" if dcn else ""


def cost_text(r: dict[str, Any]) -> str:
    usd = r.get("usd_per_million_tokens")
    if usd is None:
        return ""
    return "$" + span(usd, "{:.2f}" if max(usd) >= 0.1 else "{:.4f}")  # a small model's cents: still figures


def format_row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['setting']}: {'does not fit' if r.get('fits') is False else 'failed'}: {r['error']}"
    sent = sum(v["bytes"] for v in r["collectives"].values())
    measured = (f", measured {_ms(r['measured_step_s'])} ms (MFU {100 * r['measured_mfu']:.1f}%)"
                if "measured_step_s" in r else "")
    cost = f", {cost_text(r)} per 1M tokens" if "usd_per_million_tokens" in r else ""
    flag = f" ({r['flops_flag']})" if r["flops_flag"] else ""
    step_ms, mfu = span([1e3 * x for x in r["estimated_step_s"]]), span([100 * x for x in r["estimated_mfu"]])
    return (f"{r['setting']} attention={r['attention']}: {gib(r['total_bytes'])}/device peak"
            f"{' fits (compiled)' if r['fits'] else ''}, TFLOPs/device model / work / XLA {_flops(r)}{flag}, "
            f"collectives {sent / 1e9:.3f} GB/step{_dcn(r)}, estimated {step_ms} ms{measured}, MFU {mfu}%, "
            f"{span(r['tokens_per_s_per_chip'], '{:,.0f}')} tok/s/chip{cost}, compile {r['compile_s']:.1f} s")


def markdown(rows: list[dict[str, Any]]) -> str:
    """A table of the rows: memory per device (the compiler's verdict on fitting), FLOPs three ways,
    collectives, the estimated step-time and MFU ranges (and the measured step), tokens/s per chip and
    the price per million tokens."""
    head = ("| setting | attention | peak per device (args + out + temp) | HBM allowed | fits "
            "| TFLOPs/device: model / work / XLA | all-gather / reduce-scatter / all-reduce GB | est. step ms "
            "| est. MFU | measured ms (MFU) | tok/s/chip "
            "| $ per 1M tokens |\n" + "|---" * 12 + "|")
    lines = [head]
    for r in rows:
        if "error" in r:
            fit = "no" if r.get("fits") is False else "failed"
            lines.append(f"| {r['setting']} | | | {gib(r.get('hbm_bytes'))} | {fit}: {r['error'][:120]} |"
                         + " |" * 7)
            continue
        col = r["collectives"]
        gb = " / ".join(f"{col[k]['bytes'] / 1e9:.3f}" for k in ("all-gather", "reduce-scatter", "all-reduce"))
        fit = "" if r["fits"] is None else ("yes" if r["fits"] else "no")
        measured = (f"{_ms(r['measured_step_s'])} ({100 * r['measured_mfu']:.1f}%)" if "measured_step_s" in r
                    else "")
        parts = " + ".join(gib(r[k]) for k in ("argument_bytes", "output_bytes", "temp_bytes"))
        lines.append(f"| {r['setting']} | {r['attention']} | {gib(r['total_bytes'])} ({parts}) | "
                     f"{gib(r['hbm_bytes'])} | {fit} | {_flops(r)} | {gb} | "
                     f"{span([1e3 * x for x in r['estimated_step_s']])} | "
                     f"{span([100 * x for x in r['estimated_mfu']])}% | {measured} | "
                     f"{span(r['tokens_per_s_per_chip'], '{:,.0f}')} | {cost_text(r)} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], out: Any) -> list[Any]:
    """memory.png (memory per device by setting, the HBM line) and step_time.png (estimated and
    measured step time by setting) in the folder `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "error" not in r]
    if not done:
        return []
    labels = [r["setting"] for r in done]
    x = np.arange(len(done))
    files = []
    fig, ax = plt.subplots(figsize=(max(6, len(done) * 1.2), 4), dpi=110)
    bottom = np.zeros(len(done))
    parts = {"arguments": lambda r: r["argument_bytes"], "temporaries": lambda r: r["temp_bytes"],
             "outputs (beyond donated arguments)": lambda r: r.get("buffer_bytes", r["total_bytes"])
             - r["argument_bytes"] - r["temp_bytes"]}
    for name, part in parts.items():
        values = np.array([part(r) / 2**30 for r in done])
        ax.bar(x, values, bottom=bottom, label=name)
        bottom += values
    ax.scatter(x, [r["total_bytes"] / 2**30 for r in done], marker="_", s=600, color="black", zorder=3,
               label="peak (what must fit)")
    hbm = [r["hbm_bytes"] for r in done if r["hbm_bytes"]]
    if hbm:
        ax.axhline(hbm[0] / 2**30, color="red", linestyle="--", label="HBM the compiler allows")
    ax.set_ylabel("GiB per device")
    files.append(_save(fig, ax, x, labels, out / "memory.png"))
    fig, ax = plt.subplots(figsize=(max(6, len(done) * 1.2), 4), dpi=110)
    fast, slow = (np.array([1e3 * r["estimated_step_s"][k] for r in done]) for k in (0, 1))
    ax.bar(x - 0.2, slow - fast, bottom=fast, width=0.4, label="estimated (range)")
    if any("measured_step_s" in r for r in done):
        ax.bar(x + 0.2, [1e3 * r.get("measured_step_s", 0.0) for r in done], width=0.4, label="measured")
    ax.set_ylabel("ms per step")
    files.append(_save(fig, ax, x, labels, out / "step_time.png"))
    return files


def _save(fig: Any, ax: Any, x: np.ndarray, labels: list[str], path: Any) -> Any:
    import matplotlib.pyplot as plt

    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with path.open("wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path
