"""Convert between a Hugging Face model directory and lightjax (lightjax/train/export.py does the work).

    # HF -> lightjax export directory (params, model_config.json, tokenizer/, base/)
    python scripts/convert_hf.py import --hf_dir path/to/Qwen3-0.6B --out exports/qwen3
    # lightjax run or export directory -> HF directory (config.json, generation_config.json,
    # model.safetensors, the tokenizer's files)
    python scripts/convert_hf.py export --workdir runs/baseline --out hf/baseline
    python scripts/convert_hf.py export --export_dir exports/qwen3 --out hf/qwen3 --dtype bfloat16
    # a LoRA run: its adapters merged into the weights (W + alpha/r B A), or with --adapters_only alone (PEFT)
    python scripts/convert_hf.py export --workdir runs/lora --out hf/lora
    python scripts/convert_hf.py export --workdir runs/lora --out hf/lora-adapters --adapters_only

An imported directory is what `scripts/generate.py --export_dir` and `lightjax.convert.export.load_exported` read;
an exported one is what `transformers.AutoModelForCausalLM.from_pretrained` and `AutoTokenizer` read, and an
adapters one what `peft.PeftModel.from_pretrained` reads. Export writes the base model's architecture
(base/config.json's model_type), else --model_type, else the first supported one the ModelConfig fits.
"""

import sys

from absl import flags

from lightjax.runtime.cli import define_overwrite_flag, define_step_flag

_HF_DIR = flags.DEFINE_string("hf_dir", None, "import: the Hugging Face model directory.")
_WORKDIR = flags.DEFINE_string("workdir", None, "export: a lightjax run directory (its latest checkpoint, or --step).")
_STEP = define_step_flag("export --workdir: the checkpoint")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "export: a lightjax export directory instead of --workdir.")
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype written.")
_MODEL_TYPE = flags.DEFINE_string("model_type", None, "export: the HF architecture (model_type) to write.")
_ADAPTERS_ONLY = flags.DEFINE_bool("adapters_only", False, "export --workdir of a LoRA run: write its adapters "
                                   "alone, in PEFT's format (adapter_config.json, adapter_model.safetensors), "
                                   "instead of merged weights.")
_OVERWRITE = define_overwrite_flag()
COMMANDS = ("import", "export")


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        sys.exit(f"convert_hf: give one command, 'import' or 'export' (got {argv[1:]}).")
    from lightjax.train.checkpoint import CheckpointError
    from lightjax.train.export import export_adapters, export_hf, import_hf

    try:
        if argv[1] == "import":
            if not _HF_DIR.value:
                sys.exit("convert_hf: import needs --hf_dir.")
            print(import_hf(_HF_DIR.value, _OUT.value, _DTYPE.value, _OVERWRITE.value))
        elif bool(_WORKDIR.value) == bool(_EXPORT_DIR.value):
            sys.exit("convert_hf: export needs exactly one of --workdir and --export_dir.")
        elif _ADAPTERS_ONLY.value:
            if not _WORKDIR.value:
                sys.exit("convert_hf: --adapters_only needs --workdir (a LoRA run).")
            out = export_adapters(_WORKDIR.value, _OUT.value, _STEP.value, _OVERWRITE.value)
            print(f"Exported the LoRA adapters of {_WORKDIR.value} to {out} (PEFT's format).")
        else:
            print(export_hf(_OUT.value, _WORKDIR.value, _EXPORT_DIR.value, _STEP.value, _DTYPE.value,
                            _MODEL_TYPE.value, _OVERWRITE.value))
    except (OSError, ValueError, CheckpointError) as e:
        sys.exit(f"convert_hf: {e}")


if __name__ == "__main__":
    from lightjax.runtime.cli import run_script

    run_script(main, "convert_hf")
