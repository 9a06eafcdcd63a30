"""Smoke test: overfit one fixed batch and check that gradients reach every layer.

    python scripts/smoke_test.py                                  # configs/smoke.py, this machine's devices
    python scripts/smoke_test.py --host_devices=8 --config.mesh.fsdp=8 --config.mesh.data=1
    python scripts/smoke_test.py --config.data.local_path=path/to/input.txt   # offline

Trains config.train.max_steps updates on the first batch of the configured data. Passes (exit 0)
when the loss falls by at least --min_reduction and every parameter leaf, layer by layer, received a
non-zero finite gradient at the first step; prints a table of the figures either way.
"""

import sys

from absl import flags
from ml_collections import config_flags

from lightjax.runtime.cli import simulate_host_devices

_CONFIG = config_flags.DEFINE_config_file("config", "configs/smoke.py", "Run config file.", lock_config=True)
_MIN_REDUCTION = flags.DEFINE_float("min_reduction", 0.95, "Fraction by which the loss must fall.")
_HOST_DEVICES = flags.DEFINE_integer("host_devices", 0, "Simulate this many CPU devices (sets XLA_FLAGS).")


def main(argv):
    del argv
    simulate_host_devices(_HOST_DEVICES.value)
    import jax

    from lightjax.checks.smoke import overfit_one_batch

    try:
        result = overfit_one_batch(_CONFIG.value, min_reduction=_MIN_REDUCTION.value)
    except (OSError, ValueError) as e:
        sys.exit(f"smoke_test: {e}")
    mesh = _CONFIG.value.mesh
    print(f"smoke test on {jax.device_count()} {jax.devices()[0].platform} device(s), "
          f"mesh data={mesh.data} fsdp={mesh.fsdp} tensor={mesh.tensor}")
    print(result.table())
    for name in result.dead_leaves:
        print(f"  no gradient: {name}")
    print("PASS" if result.passed else "FAIL")
    sys.exit(0 if result.passed else 1)


if __name__ == "__main__":
    from lightjax.runtime.cli import run_script

    run_script(main, "smoke_test")
