"""The run configuration: every key a run depends on, its default, and its validation.

Config files under `configs/` start from `default_config()` and change what they need; `validate`
checks a resolved config once at start-up and raises `ConfigError` naming the key, so that a bad
value is a one-line message rather than a traceback from deep inside JAX.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from lightjax.data import tiny_shakespeare
from lightjax.data.instructions import PROMPT_STYLES
from lightjax.model.config import ModelConfig
from lightjax.model.gpt import REMAT_POLICIES
from lightjax.runtime.sharding import mesh_shape
from lightjax.train.optim import SCHEDULES

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # train.dtype / train.param_dtype names


class ConfigError(ValueError):
    """A run config value that cannot work; the message names the key."""


def default_config() -> ml_collections.ConfigDict:
    """Every key with its default; the defaults are the baseline run (configs/baseline.py)."""
    c = ml_collections.ConfigDict()

    # config.model.name is a preset (ModelConfig.names()); every other key is a ModelConfig field,
    # None (the preset's value) unless set: --config.model.n_layer=4.
    c.model = ml_collections.ConfigDict({"name": "baseline-tiny", **_model_placeholders()})

    c.data = _data_defaults()
    c.lora = _lora_defaults()

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices left over by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.rules = "default"  # a name in sharding.RULE_SETS, or a tuple of (logical axis, mesh axes) pairs

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.min_lr = 1e-4
    c.optim.warmup_steps = 200
    c.optim.schedule = "cosine"
    c.optim.decay_fraction = 0.2  # wsd: the share of steps spent decaying at the end
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.no_decay = ("bias", "scale", "embedding")  # parameter names left undecayed; () decays all
    c.optim.clip_norm = 1.0  # 0 turns clipping off

    c.train = ml_collections.ConfigDict()
    c.train.seed = 1337
    c.train.global_batch_size = 32
    c.train.grad_accum_steps = 1
    c.train.max_steps = 3000
    c.train.max_tokens = 0  # 0: no limit
    c.train.max_time_s = 0.0  # 0: no limit
    c.train.stop_after = 0  # end this invocation after this step (saving); the schedule still ends at max_steps
    c.train.dtype = "float32"  # compute dtype
    c.train.param_dtype = "float32"
    c.train.remat = "none"
    c.train.scan_layers = False
    c.train.z_loss = 0.0
    c.train.skip_nonfinite = False  # skip an update whose loss is not finite, instead of stopping
    # Start from these weights (fine-tuning): an export directory (scripts/export.py, convert_hf.py
    # import) or a Hugging Face model directory. Their architecture must be config.model's.
    c.train.init_from = ""
    c.train.log_every = 10
    c.train.eval_every = 250
    c.train.eval_batches = 20
    c.train.peak_flops = 0.0  # per device, for MFU; 0: from the device kind (CPU: measured)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.save_every = 500
    c.checkpoint.keep = 3  # the latest checkpoints kept
    # ... and beside them the checkpoints of the lowest validation losses (Orbax's BestN); an evaluation
    # that beats the run's best saves one. scripts take it with --step best. 0: only the latest.
    c.checkpoint.keep_best = 1
    c.checkpoint.resume = "auto"
    c.checkpoint.async_save = True

    c.logging = ml_collections.ConfigDict()
    c.logging.progress = True
    c.logging.tensorboard = True
    c.logging.wandb_project = ""
    return c


def _data_defaults() -> ml_collections.ConfigDict:
    """config.data: where the text comes from, how it is tokenized and cut."""
    d = ml_collections.ConfigDict()
    d.source = "tiny_shakespeare"
    d.local_path = ""  # tiny_shakespeare: a local input.txt instead of the download
    d.download_url = tiny_shakespeare.URL  # tiny_shakespeare: where it is downloaded from (a mirror works)
    d.data_dir = ""  # where TFDS datasets are prepared and read ("" = TFDS's default); local, process 0's
    d.text_field = "text"  # tfds:NAME and .jsonl: the field holding the text
    d.val_split = "validation"  # tfds:NAME: the split used for validation
    # Where the tokenized splits are kept ("" = WORKDIR/data). A shared folder (gs:// works) lets runs on
    # the same data and tokenizer reuse them instead of tokenizing a large corpus again.
    d.tokens_dir = ""
    d.tokenizer = "char"
    d.seq_len = 256
    d.num_workers = 0
    d.val_fraction = 0.05
    # Instruction sources (json:/jsonl:): the prompt template ('alpaca', or 'chat': the hf:DIR
    # tokenizer's chat template), and whether examples are packed into rows or padded one per row.
    d.prompt_style = "alpaca"
    d.pack = False
    return d


def _lora_defaults() -> ml_collections.ConfigDict:
    """config.lora, LoRA fine-tuning (lora.py): adapters of this rank on the targeted layers train, every
    other weight stays frozen (usually with train.init_from set). 0: no adapters, everything trains."""
    lora = ml_collections.ConfigDict()
    lora.rank = 0
    lora.alpha = 16.0
    lora.dropout = 0.05
    lora.targets = ("query", "value")  # any of query, key, value, proj, mlp, head
    return lora


def _model_placeholders() -> dict[str, Any]:
    """A typed None for each ModelConfig field, so that a locked config accepts overrides of them."""
    types = {"rope_base": float, "rope_adjustments": dict, "rope_local_base_freq": float,
             "attention_logit_softcapping": float, "final_logit_softcapping": float,
             "sliding_window_indices": tuple, "rope_indices": tuple}
    out = {}
    for f in dataclasses.fields(ModelConfig):
        if f.init and f.name != "name" and not f.name.startswith("lora_"):  # LoRA is config.lora
            default_type = type(f.default) if f.default is not None else int  # other optional fields are ints
            out[f.name] = config_dict.placeholder(types.get(f.name, default_type))
    return out


def resolve_model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The ModelConfig of a run: the named preset with the other `config.model` keys as overrides,
    and config.lora's adapters (a config saved before LoRA existed has none)."""
    fields = {k: v for k, v in config.model.to_dict().items() if v is not None}
    name = fields.pop("name")
    lora = config.get("lora")
    if lora is not None and lora.rank:
        fields.update({field: lora[key] for field, key in _LORA_KEYS.items()})
    try:
        return ModelConfig.from_name(name, **fields)
    except TypeError as e:  # an unknown field name
        raise ConfigError(f"config.model: {e}") from None
    except ValueError as e:
        message = str(e)
        for field, key in _LORA_KEYS.items():
            message = message.replace(f"ModelConfig.{field}=", f"config.lora.{key}=")
        raise ConfigError(message if "config.lora." in message else f"config.model: {message}") from None


# ModelConfig's LoRA fields and the config.lora keys that set them.
_LORA_KEYS = {"lora_r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_targets": "targets"}


def validate(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
    """Check everything that can be checked before building anything.

    Every problem found is reported, in one ConfigError whose message names each key."""
    problems: list[str] = []

    def check(ok: bool, key: str, value: Any, why: str) -> None:
        if not ok:
            problems.append(f"config.{key}={value!r} {why}")

    o, t, d, ck = config.optim, config.train, config.data, config.checkpoint
    check(o.lr > 0, "optim.lr", o.lr, "must be positive")
    check(0 <= o.min_lr <= max(o.lr, 0), "optim.min_lr", o.min_lr, f"must be in [0, optim.lr={o.lr}]")
    check(o.schedule in SCHEDULES, "optim.schedule", o.schedule, f"is not one of {', '.join(SCHEDULES)}")
    check(0 <= o.warmup_steps < t.max_steps, "optim.warmup_steps", o.warmup_steps,
          f"must be in [0, train.max_steps={t.max_steps})")
    check(0 < o.decay_fraction <= 1, "optim.decay_fraction", o.decay_fraction, "must be in (0, 1]")
    check(0 <= o.b1 < 1, "optim.b1", o.b1, "must be in [0, 1)")
    check(0 <= o.b2 < 1, "optim.b2", o.b2, "must be in [0, 1)")
    check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    check(o.clip_norm >= 0, "optim.clip_norm", o.clip_norm, "must be >= 0 (0 turns clipping off)")
    check(t.max_steps > 0, "train.max_steps", t.max_steps, "must be positive")
    check(t.dtype in DTYPES, "train.dtype", t.dtype, f"is not one of {', '.join(DTYPES)}")
    check(t.param_dtype in DTYPES, "train.param_dtype", t.param_dtype, f"is not one of {', '.join(DTYPES)}")
    check(t.grad_accum_steps >= 1, "train.grad_accum_steps", t.grad_accum_steps, "must be >= 1")
    check(t.remat in REMAT_POLICIES, "train.remat", t.remat, f"is not one of {', '.join(REMAT_POLICIES)}")
    check(t.log_every >= 1, "train.log_every", t.log_every, "must be >= 1")
    check(t.eval_every >= 0, "train.eval_every", t.eval_every, "must be >= 0 (0: no evaluation)")
    check(not t.init_from or _is_weights_dir(t.init_from), "train.init_from", t.init_from,
          "is not an export directory (model_config.json) or a Hugging Face one (config.json)")
    check(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
    check(0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "must be in (0, 1)")
    check(d.tokenizer in ("char", "byte") or d.tokenizer.startswith(("spm:", "hf:")), "data.tokenizer", d.tokenizer,
          "is not one of 'char', 'byte', 'spm:PATH', 'hf:DIR'")
    check(d.source == "tiny_shakespeare" or d.source.startswith(("tfds:", "text:", "json:", "jsonl:")), "data.source",
          d.source, "is not one of 'tiny_shakespeare', 'tfds:NAME', 'text:GLOB', 'json:PATH', 'jsonl:PATH'")
    check(d.prompt_style in PROMPT_STYLES, "data.prompt_style", d.prompt_style,
          f"is not one of {', '.join(PROMPT_STYLES)}")
    check(d.prompt_style != "chat" or d.tokenizer.startswith("hf:"), "data.prompt_style", d.prompt_style,
          f"needs the model's own tokenizer, data.tokenizer='hf:DIR' (is {d.tokenizer!r})")
    check(not d.local_path or Path(d.local_path).is_file(), "data.local_path", d.local_path, "does not exist")
    check("://" not in d.data_dir, "data.data_dir", d.data_dir,
          "must be a local folder: ArrayRecord files are read with local file I/O (only process 0 reads the data "
          "source; the workdir may be on gs://)")
    check(ck.save_every >= 0, "checkpoint.save_every", ck.save_every, "must be >= 0 (0: only at the end)")
    check(ck.keep >= 1, "checkpoint.keep", ck.keep, "must be >= 1")
    check(ck.keep_best >= 0, "checkpoint.keep_best", ck.keep_best, "must be >= 0 (0: only the latest are kept)")
    check(bool(str(ck.resume).strip()), "checkpoint.resume", ck.resume,
          "must be 'auto', 'never', or a run directory or checkpoint path")

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
        shape = None
    if shape is not None:
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
    if problems:
        raise ConfigError("; ".join(problems) + ".")


def _is_weights_dir(path: str) -> bool:
    return any((Path(path) / name).is_file() for name in ("model_config.json", "config.json"))
