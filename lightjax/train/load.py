"""The model a script is pointed at, with its tokenizer: a run's checkpoint (`--workdir`, `--step`, `best`
included), an export (`--export_dir`: scripts/export.py or convert_hf.py import) or a Hugging Face folder
(`--hf_dir`). scripts/generate.py and scripts/evaluate.py take the same three."""

from __future__ import annotations

import dataclasses
from typing import Any

from lightjax.data.tokenizers import Tokenizer, load_hf_tokenizer, load_tokenizer
from lightjax.model.gpt import GPT


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    model: GPT
    params: Any
    tokenizer: Tokenizer
    description: str  # what was loaded, for the output's first line
    config: Any = None  # the run's ConfigDict; None for an export or a Hugging Face folder
    step: int | None = None  # the run's checkpoint's


def load_model(workdir: str | None = None, step: int | str | None = None, hf_dir: str | None = None,
               export_dir: str | None = None) -> LoadedModel:
    """Exactly one of `workdir` (its checkpoint at `step`, default the latest; a LoRA run's model keeps
    its adapters), `export_dir` and `hf_dir`."""
    if sum(map(bool, (workdir, hf_dir, export_dir))) != 1:
        raise ValueError("give exactly one of --workdir, --hf_dir and --export_dir.")
    if export_dir:
        from lightjax.convert.export import load_exported

        cfg, params = load_exported(export_dir)
        return LoadedModel(GPT(cfg), params, load_tokenizer(f"{export_dir}/tokenizer"), f"{export_dir} ({cfg.name})")
    if hf_dir:
        from lightjax.convert.hf import load_hf_checkpoint

        cfg, params = load_hf_checkpoint(hf_dir)
        return LoadedModel(GPT(cfg), params, load_hf_tokenizer(hf_dir), f"{hf_dir} ({cfg.name})")
    from lightjax.train.checkpoint import restore_params
    from lightjax.train.config import resolve_model_config
    from lightjax.train.run import build_model

    config, params, step = restore_params(workdir, step)
    model = build_model(resolve_model_config(config), config.train)  # with its LoRA adapters, if any
    return LoadedModel(model, params, load_tokenizer(f"{workdir}/tokenizer"), f"{workdir} step {step}", config, step)
