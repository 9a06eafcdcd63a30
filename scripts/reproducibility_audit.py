"""Reproducibility audit: record the environment, then check that training is deterministic.

    python scripts/reproducibility_audit.py                       # configs/audit.py, writes audit/
    python scripts/reproducibility_audit.py --config configs/nano_cpu.py --out runs/audit-nano
    python scripts/reproducibility_audit.py --config.data.local_path=path/to/input.txt   # offline

Writes OUT/environment.json and OUT/environment.md (software versions, devices, CPU, XLA flags and
environment variables, git commit, the config and its sha256), then trains the config twice with its
seed (the loss of every step must be identical) and once with --second_seed (the final loss must be
within --tolerance of the first), and adds the figures and verdicts to both files. Exit status 1 when
a check fails.
"""

import json
import sys
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from lightjax.runtime.cli import define_overwrite_flag

_CONFIG = config_flags.DEFINE_config_file("config", "configs/audit.py", "Run config file.", lock_config=True)
_OUT = flags.DEFINE_string("out", "audit", "Directory for environment.json and environment.md.")
_SECOND_SEED = flags.DEFINE_integer("second_seed", None, "The other seed (default: the config's seed + 1).")
_OVERWRITE = define_overwrite_flag()
_TOLERANCE = flags.DEFINE_float("tolerance", 0.01, "Largest relative difference of the two seeds' final losses.")


def _write(out: Path, report: dict) -> None:
    from lightjax.checks.audit import audit_markdown

    (out / "environment.json").write_text(json.dumps(report, indent=1))
    (out / "environment.md").write_text(audit_markdown(report))


def main(argv):
    del argv
    from lightjax.checks.audit import determinism_check, environment
    from lightjax.runtime.files import output_dir
    from lightjax.runtime.logs import quiet_orbax_errors
    from lightjax.train.validate import validate

    quiet_orbax_errors()

    config, out = _CONFIG.value, Path(_OUT.value)
    try:
        validate(config)
    except ValueError as e:
        sys.exit(f"reproducibility_audit: {e}")
    report = {"environment": environment(config)}
    try:
        with output_dir(out, "audit", _OVERWRITE.value) as folder:
            _write(folder, report)  # the environment is on record even if a run below fails
            report["determinism"] = determinism_check(config, _SECOND_SEED.value, _TOLERANCE.value)
            _write(folder, report)
    except OSError as e:
        sys.exit(f"reproducibility_audit: cannot write the report to --out={out}: {e.strerror or e}")
    except ValueError as e:
        sys.exit(f"reproducibility_audit: {e}")
    check = report["determinism"]
    a, b = check["runs"]["seed_a"], check["runs"]["seed_b"]
    print(f"same seed twice ({a['seed']}): {a['steps']} steps, losses identical: {check['same_seed_identical']} "
          f"(largest difference {check['same_seed_max_abs_diff']:.3g})")
    print(f"seed {a['seed']} vs {b['seed']}: final loss {a['final_loss']:.4f} vs {b['final_loss']:.4f}, "
          f"{check['seed_relative_diff']:.2%} apart (tolerance {check['seed_tolerance']:.0%})")
    print(f"{'PASS' if check['passed'] else 'FAIL'}; wrote {out / 'environment.json'} and {out / 'environment.md'}")
    sys.exit(0 if check["passed"] else 1)


if __name__ == "__main__":
    from lightjax.runtime.cli import run_script

    run_script(main, "reproducibility_audit")
