"""`validate(config)`: every setting of a run that can be checked before anything is built, checked at
once. Every problem found is reported in one ConfigError whose message names each key, so that a bad
value is a one-line message rather than a traceback from deep inside JAX. Each vocabulary (sources,
tokenizers, prompt styles, schedules, remat policies, attention kernels, dtypes) is its owner's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections

from lightjax.data.mixture import parse_mixture
from lightjax.data.preferences import is_preference_source
from lightjax.data.prompts import PROMPT_STYLES
from lightjax.data.records import is_instruction_source
from lightjax.data.sources import SOURCES, is_known_source
from lightjax.data.tokenizers import TOKENIZERS, is_known_tokenizer
from lightjax.model.attention import ATTENTION_KERNELS
from lightjax.model.gpt import REMAT_POLICIES
from lightjax.runtime.sharding import mesh_shape
from lightjax.train.config import DTYPES, ConfigError, resolve_model_config
from lightjax.train.optim import SCHEDULES
from lightjax.train.preference import PREFERENCE_LOSSES

Check = Callable[[bool, str, Any, str], None]


def validate(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
    """Raise ConfigError naming every key whose value cannot work (`device_count`: the mesh's devices,
    default all of this job's)."""
    problems: list[str] = []

    def check(ok: bool, key: str, value: Any, why: str) -> None:
        if not ok:
            problems.append(f"config.{key}={value!r} {why}")

    _check_optim(config.optim, config.train.max_steps, check)
    _check_train(config.train, check)
    _check_data(config.data, check)
    _check_mixture(config.data, check, problems)
    _check_checkpoint(config.checkpoint, check)
    if "preference" in config:  # configs saved before preference tuning have none
        _check_preference(config.preference, check)
    _check_model_and_mesh(config, device_count, check, problems)
    if problems:
        raise ConfigError("; ".join(problems) + ".")


def _one_of(names: Any) -> str:
    return f"is not one of {', '.join(names)}"


def _check_optim(o: Any, max_steps: int, check: Check) -> None:
    check(o.lr > 0, "optim.lr", o.lr, "must be positive")
    check(0 <= o.min_lr <= max(o.lr, 0), "optim.min_lr", o.min_lr, f"must be in [0, optim.lr={o.lr}]")
    check(o.schedule in SCHEDULES, "optim.schedule", o.schedule, _one_of(SCHEDULES))
    check(0 <= o.warmup_steps < max_steps, "optim.warmup_steps", o.warmup_steps,
          f"must be in [0, train.max_steps={max_steps})")
    check(0 < o.decay_fraction <= 1, "optim.decay_fraction", o.decay_fraction, "must be in (0, 1]")
    check(0 <= o.b1 < 1, "optim.b1", o.b1, "must be in [0, 1)")
    check(0 <= o.b2 < 1, "optim.b2", o.b2, "must be in [0, 1)")
    check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    check(o.clip_norm >= 0, "optim.clip_norm", o.clip_norm, "must be >= 0 (0 turns clipping off)")


def _check_train(t: Any, check: Check) -> None:
    check(t.max_steps > 0, "train.max_steps", t.max_steps, "must be positive")
    check(t.dtype in DTYPES, "train.dtype", t.dtype, _one_of(DTYPES))
    check(t.param_dtype in DTYPES, "train.param_dtype", t.param_dtype, _one_of(DTYPES))
    check(t.grad_accum_steps >= 1, "train.grad_accum_steps", t.grad_accum_steps, "must be >= 1")
    check(t.remat in REMAT_POLICIES, "train.remat", t.remat, _one_of(REMAT_POLICIES))
    check(t.attention in ATTENTION_KERNELS, "train.attention", t.attention, _one_of(ATTENTION_KERNELS))
    check(t.log_every >= 1, "train.log_every", t.log_every, "must be >= 1")
    check(t.eval_every >= 0, "train.eval_every", t.eval_every, "must be >= 0 (0: no evaluation)")
    check(not t.eval_tasks or t.eval_every > 0, "train.eval_tasks", t.eval_tasks,
          "runs at evaluation steps, but train.eval_every=0")
    check(t.eval_tasks_limit > 0, "train.eval_tasks_limit", t.eval_tasks_limit,
          "must be a positive number of documents")
    check(not t.eval_tasks_path or Path(t.eval_tasks_path).is_dir(), "train.eval_tasks_path", t.eval_tasks_path,
          "is not a folder (of task YAML files)")
    check(not t.init_from or _is_weights_dir(t.init_from), "train.init_from", t.init_from,
          "is not an export directory (model_config.json), a Hugging Face one (config.json) or a PEFT adapter "
          "folder (adapter_config.json)")


def _check_preference(p: Any, check: Check) -> None:
    check(p.beta > 0, "preference.beta", p.beta, "must be > 0")
    check(p.loss in PREFERENCE_LOSSES, "preference.loss", p.loss, _one_of(PREFERENCE_LOSSES))
    check(0 <= p.label_smoothing < 0.5, "preference.label_smoothing", p.label_smoothing, "must be in [0, 0.5)")


def _check_data(d: Any, check: Check) -> None:
    check(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    check(0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "must be in (0, 1)")
    check(is_known_tokenizer(d.tokenizer), "data.tokenizer", d.tokenizer, _one_of(map(repr, TOKENIZERS)))
    check(is_known_source(d.source), "data.source", d.source, _one_of(map(repr, SOURCES)))
    check(d.prompt_style in PROMPT_STYLES, "data.prompt_style", d.prompt_style, _one_of(PROMPT_STYLES))
    check(d.prompt_style != "chat" or d.tokenizer.startswith("hf:"), "data.prompt_style", d.prompt_style,
          f"needs the model's own tokenizer, data.tokenizer='hf:DIR' (is {d.tokenizer!r})")
    check(not d.local_path or Path(d.local_path).is_file(), "data.local_path", d.local_path, "does not exist")
    if is_preference_source(d.source):  # a pair per row, its two sides told apart by their segment ids
        check(not d.pack, "data.pack", d.pack, "must be False for preference pairs (each row holds one pair)")
        check(d.document_mask, "data.document_mask", d.document_mask,
              "must be True for preference pairs (a row's chosen and rejected sides must not see each other)")
    check("://" not in d.data_dir, "data.data_dir", d.data_dir,
          "must be a local folder: ArrayRecord files are read with local file I/O (only process 0 reads the data "
          "source; the workdir may be on gs://)")


def _check_mixture(d: Any, check: Check, problems: list[str]) -> None:
    """A mixture's sources: text sources that a shared, fixed tokenizer reads."""
    try:
        mixture = parse_mixture(d)
    except ValueError as e:
        problems.append(str(e).rstrip("."))
        return
    if mixture is None:
        return
    check(d.tokenizer != "char", "data.tokenizer", d.tokenizer, "cannot serve a mixture: a 'char' tokenizer is "
          "built from one source's text; use 'byte', 'spm:PATH' or 'hf:DIR'")
    for name, data in zip(mixture.names, mixture.data, strict=True):
        check(is_known_source(data.source) and not is_instruction_source(data.source),
              f"data.mixture.{name}.source", data.source, "is not a text source of a mixture (" + ", ".join(
                  s for s in SOURCES if not s.startswith("json")) + ")")


def _check_checkpoint(ck: Any, check: Check) -> None:
    check(ck.save_every >= 0, "checkpoint.save_every", ck.save_every, "must be >= 0 (0: only at the end)")
    check(ck.keep >= 1, "checkpoint.keep", ck.keep, "must be >= 1")
    check(ck.keep_best >= 0, "checkpoint.keep_best", ck.keep_best, "must be >= 0 (0: only the latest are kept)")
    check(bool(str(ck.resume).strip()), "checkpoint.resume", ck.resume,
          "must be 'auto', 'never', or a run directory or checkpoint path")


def _check_model_and_mesh(config: Any, device_count: int | None, check: Check, problems: list[str]) -> None:
    """The model's own fields, and what the mesh and the batch need of each other and of the model."""
    t, d = config.train, config.data
    cfg = None
    try:
        cfg = resolve_model_config(config)
    except ConfigError as e:
        problems.append(str(e).rstrip("."))
    if cfg is not None:
        check(0 < d.seq_len <= cfg.block_size, "data.seq_len", d.seq_len,
              f"must be in [1, model block_size={cfg.block_size}]")
    try:
        shape = mesh_shape(config.mesh, device_count)
    except ValueError as e:
        problems.append(str(e).rstrip("."))
        return
    per_step = shape["data"] * shape["fsdp"] * t.grad_accum_steps
    check(t.global_batch_size > 0 and t.global_batch_size % per_step == 0, "train.global_batch_size",
          t.global_batch_size,
          f"must be divisible by mesh.data*mesh.fsdp*train.grad_accum_steps = {shape['data']}*{shape['fsdp']}"
          f"*{t.grad_accum_steps} = {per_step}")
    if cfg is not None:
        tp = shape["tensor"]
        check(cfg.n_head % tp == 0, "mesh.tensor", tp, f"must divide the model's n_head={cfg.n_head}")
        check(cfg.n_query_groups % tp == 0, "mesh.tensor", tp,
              f"must divide the model's n_query_groups={cfg.n_query_groups}")


def _is_weights_dir(path: str) -> bool:
    return any((Path(path) / name).is_file() for name in ("model_config.json", "config.json", "adapter_config.json"))
