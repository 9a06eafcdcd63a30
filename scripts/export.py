"""Export a run's parameters (no optimizer state) for inference or conversion.

    python scripts/export.py --workdir runs/baseline-20261124 --out exports/baseline --dtype bfloat16

Writes OUT/params (Orbax), OUT/model_config.json and OUT/tokenizer/; read them back with
`lightjax.checkpoint.load_exported(OUT)`.
"""

import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype of the export.")


def main(argv):
    del argv
    from lightjax.checkpoint import CheckpointError, export_params

    try:
        out = export_params(_WORKDIR.value, _OUT.value, _STEP.value, _DTYPE.value)
    except (OSError, ValueError, CheckpointError) as e:
        sys.exit(f"export: {e}")
    print(f"Exported the parameters to {out} ({_DTYPE.value}).")


if __name__ == "__main__":
    from lightjax.cli import one_line_flags_parser

    app.run(main, flags_parser=one_line_flags_parser("export"))
