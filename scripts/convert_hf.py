"""Convert between a Hugging Face model directory and lightjax.

    # HF -> lightjax export directory (params, model_config.json, tokenizer/, hf_config.json)
    python scripts/convert_hf.py import --hf_dir path/to/Qwen3-0.6B --out exports/qwen3
    # lightjax run or export directory -> HF directory (config.json, model.safetensors, tokenizer)
    python scripts/convert_hf.py export --workdir runs/baseline --out hf/baseline
    python scripts/convert_hf.py export --export_dir exports/qwen3 --out hf/qwen3 --dtype bfloat16
    # a LoRA run: its adapters merged into the weights (W + alpha/r B A), or with --adapters_only alone
    python scripts/convert_hf.py export --workdir runs/lora --out hf/lora

An imported directory is what `scripts/generate.py --export_dir` and `lightjax.convert.export.load_exported` read;
an exported one is what `transformers.AutoModelForCausalLM.from_pretrained` reads. Export writes the
architecture the model was imported from (hf_config.json), else --model_type, else the first
supported one the ModelConfig fits.
"""

import json
import shutil
import sys
from pathlib import Path

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
                                   "alone (adapters.safetensors, lora_config.json) instead of merged weights.")
_OVERWRITE = define_overwrite_flag()
COMMANDS = ("import", "export")


def import_hf(hf_dir: str, out: str, dtype: str, overwrite: bool = False) -> str:
    from lightjax.convert.export import save_exported
    from lightjax.convert.hf import load_hf_checkpoint, read_hf_config
    from lightjax.data.tokenizers import load_hf_tokenizer
    from lightjax.runtime.files import check_output_dir, staged_dir

    check_output_dir(out, "export", overwrite)  # before the weights are read
    cfg, params = load_hf_checkpoint(hf_dir)
    with staged_dir(out, "export", overwrite) as stage:  # a failed import leaves no half-written folder
        save_exported(stage, cfg, params, dtype)
        (stage / "hf_config.json").write_text(json.dumps(read_hf_config(hf_dir), indent=1))
        try:
            load_hf_tokenizer(hf_dir).save(stage / "tokenizer")
            tokenizer = "with its tokenizer"
        except FileNotFoundError:
            tokenizer = "without a tokenizer (none in the HF directory)"
    return f"Imported {cfg.name} ({cfg.n_layer} layers, {dtype}) into {Path(out).absolute()}, {tokenizer}."


def export_hf(workdir: str | None, step: int | str, export_dir: str | None, out: str, dtype: str,
              model_type: str | None, overwrite: bool = False) -> str:
    import jax
    import jax.numpy as jnp

    from lightjax.convert.export import load_exported
    from lightjax.convert.hf import hf_model_type, save_hf_checkpoint
    from lightjax.runtime.files import check_output_dir, staged_dir
    from lightjax.train.checkpoint import restore_model

    check_output_dir(out, "hf", overwrite)  # before the weights are read
    token_ids = {}
    if export_dir:
        cfg, params = load_exported(export_dir)
        source = Path(export_dir)
        hf_config = source / "hf_config.json"
        if hf_config.is_file():  # imported: write the same architecture and special tokens back
            original = json.loads(hf_config.read_text())
            model_type = model_type or original["model_type"]
            token_ids = original
    else:
        cfg, params, step, _ = restore_model(workdir, step)  # LoRA adapters merged
        source = Path(workdir)
    model_type = hf_model_type(cfg, model_type)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    with staged_dir(out, "hf", overwrite) as stage:  # a failed export leaves no half-written folder
        save_hf_checkpoint(stage, params, cfg, model_type, token_ids)
        tokenizer = _export_tokenizer(source / "tokenizer", Path(stage))
    return f"Exported {cfg.name} as HF {model_type} ({dtype}) to {Path(out).absolute()}; {tokenizer}."


def _export_tokenizer(tokenizer_dir: Path, out: Path) -> str:
    """The run's tokenizer in the file HF expects, where one exists."""
    from lightjax.data.tokenizers import META_FILE

    meta_path = tokenizer_dir / META_FILE
    if not meta_path.is_file():
        return "no tokenizer to copy"
    meta = json.loads(meta_path.read_text())
    if meta["kind"] == "hf":
        shutil.copyfile(tokenizer_dir / meta["file"], out / "tokenizer.json")
        return "tokenizer.json copied"
    if meta["kind"] == "spm":
        shutil.copyfile(tokenizer_dir / meta["model_file"], out / "tokenizer.model")
        return "tokenizer.model copied"
    return f"the {meta['kind']!r} tokenizer has no Hugging Face file: decode ids with lightjax's"


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        sys.exit(f"convert_hf: give one command, 'import' or 'export' (got {argv[1:]}).")
    from lightjax.train.checkpoint import CheckpointError

    try:
        if argv[1] == "import":
            if not _HF_DIR.value:
                sys.exit("convert_hf: import needs --hf_dir.")
            print(import_hf(_HF_DIR.value, _OUT.value, _DTYPE.value, _OVERWRITE.value))
        else:
            if bool(_WORKDIR.value) == bool(_EXPORT_DIR.value):
                sys.exit("convert_hf: export needs exactly one of --workdir and --export_dir.")
            if _ADAPTERS_ONLY.value:
                from lightjax.train.export import export_adapters

                if not _WORKDIR.value:
                    sys.exit("convert_hf: --adapters_only needs --workdir (a LoRA run).")
                out = export_adapters(_WORKDIR.value, _OUT.value, _STEP.value, _OVERWRITE.value)
                print(f"Exported the LoRA adapters of {_WORKDIR.value} to {out}.")
                return
            print(export_hf(_WORKDIR.value, _STEP.value, _EXPORT_DIR.value, _OUT.value, _DTYPE.value,
                            _MODEL_TYPE.value, _OVERWRITE.value))
    except (OSError, ValueError, CheckpointError) as e:
        sys.exit(f"convert_hf: {e}")


if __name__ == "__main__":
    from lightjax.runtime.cli import run_script

    run_script(main, "convert_hf")
