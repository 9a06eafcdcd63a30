"""Compile a run config under many sharding layouts and compare memory, collectives and step time.

    python scripts/shard_sweep.py --config configs/smoke.py --host_devices 8 \
        --layouts 8,1,1:1,8,1:2,2,2 --steps 3 --out runs/sweep-cpu          # local devices, measured too
    python scripts/shard_sweep.py --config configs/llama_1b.py --topology v5e-16 \
        --layouts 16,1,1:1,16,1:2,4,2 --remat none,full --batch 16,32 --out runs/sweep-v5e16
    python scripts/shard_sweep.py --config configs/llama_1b.py --topology 2xv5e-16 --layouts 2,16,1   # 2 slices
    python scripts/shard_sweep.py --config configs/llama_1b.py --config.model.name=Llama-3.1-8B \
        --compare v5e-16,v5p-8,v6e-8 --batch 16 --train_tokens 1e11    # the cheapest layout on each slice
    python scripts/shard_sweep.py --topology list                          # the chip table

--topology compiles for a TPU slice's compile-only devices (needs pip install -e ".[aot]"; 'Nx' in front:
N slices over the data-center network); without it the local devices are used and each setting also runs
--steps steps. Writes OUT/results.jsonl, OUT/results.md and OUT/memory.png, OUT/step_time.png. --compare
compiles a few layouts on each listed slice and prints the cheapest that fits on each, best first.
"""

import json
import sys

from absl import flags
from ml_collections import config_flags

from lightjax.runtime.cli import define_overwrite_flag, simulate_host_devices

_CONFIG = config_flags.DEFINE_config_file("config", "configs/smoke.py", "Run config file.", lock_config=False)
_LAYOUTS = flags.DEFINE_string("layouts", "", "Mesh shapes 'data,fsdp,tensor' separated by ':'.")
_RULES = flags.DEFINE_string("rules", "", "Rule sets (sharding.RULE_SETS), comma-separated (default: the config's).")
_REMAT = flags.DEFINE_string("remat", "", "Remat policies, comma-separated (default: the config's).")
_BATCH = flags.DEFINE_string("batch", "", "Global batch sizes, comma-separated (default: the config's).")
_TOPOLOGY = flags.DEFINE_string("topology", "", "A TPU slice (v5e-16, v5p-8, v5e:4x4) or 'list'.")
_HOST_DEVICES = flags.DEFINE_integer("host_devices", 0, "Simulate this many CPU devices (sets XLA_FLAGS).")
_STEPS = flags.DEFINE_integer("steps", 3, "Measured steps per setting on local devices (0: compile only).")
_OUT = flags.DEFINE_string("out", "runs/sweep", "Output folder (any etils.epath path).")
_COMPARE = flags.DEFINE_string("compare", "", "TPU slices to compare, comma-separated (v5e-16,v5p-8,v6e-8), with "
                               "one --batch: the cheapest layout that fits on each.")
_TRAIN_TOKENS = flags.DEFINE_float("train_tokens", 0.0, "Tokens to train, for each row's days (0: not shown).")
_PRICE = flags.DEFINE_float("chip_hour_price", None, "Price each row at this $ per chip-hour (your Spot, "
                            "committed-use or region's rate) instead of the chip's on-demand list price.")
_ALLOW_FAILURES = flags.DEFINE_bool("allow_failures", False, "Exit 0 even when a setting fails for another reason "
                                    "than not fitting in memory.")
_OVERWRITE = define_overwrite_flag()


def main(argv):
    del argv
    from lightjax.runtime.hardware import topology_table, tpu_topology

    if _TOPOLOGY.value == "list":
        print(topology_table())
        return
    simulate_host_devices(_HOST_DEVICES.value)
    import jax

    from lightjax.perf.sweep import failed, markdown, plot, settings, sweep
    from lightjax.runtime.files import check_output_dir, output_dir

    if _PRICE.value is not None and _PRICE.value <= 0:
        sys.exit(f"shard_sweep: --chip_hour_price={_PRICE.value} must be a positive $ per chip-hour, e.g. 0.48.")
    if _COMPARE.value:
        return _compare()
    try:
        devices = tpu_topology(_TOPOLOGY.value).devices() if _TOPOLOGY.value else jax.devices()
        all_settings = settings(_LAYOUTS.value, _RULES.value, _REMAT.value, _BATCH.value, len(devices))
        check_output_dir(_OUT.value, "sweep", _OVERWRITE.value)  # before hours of compiling
    except ValueError as e:
        sys.exit(f"shard_sweep: {e}")
    steps = 0 if _TOPOLOGY.value else _STEPS.value
    print(f"{len(all_settings)} settings on {len(devices)} x {devices[0].device_kind}", flush=True)
    rows = sweep(_CONFIG.value, all_settings, devices, steps, log=lambda line: print(line, flush=True),
                 train_tokens=_TRAIN_TOKENS.value, chip_hour_price=_PRICE.value)
    with output_dir(_OUT.value, "sweep", _OVERWRITE.value) as out:
        (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (out / "results.md").write_text(markdown(rows) + "\n")
        plot(rows, out)
    print(f"Wrote {out}/results.jsonl, results.md, memory.png, step_time.png.")
    bad = failed(rows)
    if bad and not _ALLOW_FAILURES.value:
        sys.exit(f"shard_sweep: {len(bad)} of {len(rows)} settings failed ({bad[0]['setting']}: {bad[0]['error']}); "
                 "see results.md, or pass --allow_failures to exit 0 with failed settings.")


def _compare():
    from lightjax.perf.compare import compare, compare_lines

    if not _BATCH.value.isdigit():
        sys.exit(f"shard_sweep: --compare needs one global batch size, --batch=N (got {_BATCH.value!r}).")
    try:
        summaries = compare(_CONFIG.value, _COMPARE.value.split(","), int(_BATCH.value), _TRAIN_TOKENS.value,
                            log=lambda line: print(line, flush=True), chip_hour_price=_PRICE.value)
    except ValueError as e:
        sys.exit(f"shard_sweep: {e}")
    print("\nThe cheapest layout that fits, by slice (best first):\n" + compare_lines(summaries))


if __name__ == "__main__":
    from lightjax.runtime.cli import run_script

    run_script(main, "shard_sweep")
