"""Export a run's parameters (no optimizer state) for inference or conversion.

    python scripts/export.py --workdir runs/baseline-20261124 --out exports/baseline --dtype bfloat16
    python scripts/export.py --workdir runs/lora --out exports/lora-adapters --adapters_only

Writes OUT/params (Orbax), OUT/model_config.json, OUT/tokenizer/ and OUT/base/ (the base model's own files),
a LoRA run's adapters merged into its weights; read them back with `lightjax.convert.export.load_exported(OUT)`.
With --adapters_only, a LoRA run's adapters alone in PEFT's format: OUT/adapter_config.json and
OUT/adapter_model.safetensors (peft.PeftModel.from_pretrained(base, OUT) reads them).
"""

import sys

from absl import flags

from lightjax.runtime.cli import define_overwrite_flag, define_step_flag

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_STEP = define_step_flag()
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype of the export.")
_ADAPTERS_ONLY = flags.DEFINE_bool("adapters_only", False, "A LoRA run: write its adapters alone, unmerged.")
_OVERWRITE = define_overwrite_flag()


def main(argv):
    del argv
    from lightjax.train.checkpoint import CheckpointError
    from lightjax.train.export import export_adapters, export_params

    try:
        if _ADAPTERS_ONLY.value:
            out = export_adapters(_WORKDIR.value, _OUT.value, _STEP.value, _OVERWRITE.value)
        else:
            out = export_params(_WORKDIR.value, _OUT.value, _STEP.value, _DTYPE.value, _OVERWRITE.value)
    except (OSError, ValueError, CheckpointError) as e:
        sys.exit(f"export: {e}")
    what = "the LoRA adapters (PEFT's format, float32)" if _ADAPTERS_ONLY.value else f"the parameters ({_DTYPE.value})"
    print(f"Exported {what} to {out}.")


if __name__ == "__main__":
    from lightjax.runtime.cli import run_script

    run_script(main, "export")
