"""The run configuration: every key a run depends on and its default.

Config files under `configs/` start from `default_config()` and change what they need; the scripts
take `--config.a.b=v` overrides. `train/validate.py` checks a resolved config once at start-up, and
`resolve_model_config` turns config.model (a preset name and field overrides) into a ModelConfig.
Importing this module is light (no JAX, Flax or Jinja): every config file imports it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import ml_collections
from ml_collections import config_dict

from lightjax.convert.hf_folder import model_config_of
from lightjax.data import tiny_shakespeare
from lightjax.model.config import ModelConfig

DTYPES = ("float32", "bfloat16")  # train.dtype / train.param_dtype


class ConfigError(ValueError):
    """A run config value that cannot work; the message names the key."""


def default_config() -> ml_collections.ConfigDict:
    """Every key with its default; the defaults are the baseline run without dropout (configs/baseline.py)."""
    c = ml_collections.ConfigDict()
    # config.model.name is a preset (ModelConfig.names()) or hf:DIR (a model folder's architecture); every
    # other key is a ModelConfig field, None (the preset's value) unless set: --config.model.n_layer=4.
    c.model = ml_collections.ConfigDict({"name": "baseline-tiny", **_model_placeholders()})
    c.data = _data_defaults()
    c.lora = _lora_defaults()
    c.preference = _preference_defaults()
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices left over by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.rules = "default"  # a name in sharding.RULE_SETS, or a tuple of (logical axis, mesh axes) pairs
    c.optim = _optim_defaults()
    c.train = _train_defaults()
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


def _optim_defaults() -> ml_collections.ConfigDict:
    """config.optim: AdamW with a warmup and a decay schedule (train/optim.py)."""
    o = ml_collections.ConfigDict()
    o.lr = 1e-3
    o.min_lr = 1e-4
    o.warmup_steps = 200
    o.schedule = "cosine"
    o.decay_fraction = 0.2  # wsd: the share of steps spent decaying at the end
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.weight_decay = 0.1
    o.no_decay = ("bias", "scale", "embedding")  # parameter names left undecayed; () decays all
    o.clip_norm = 1.0  # 0 turns clipping off
    return o


def _train_defaults() -> ml_collections.ConfigDict:
    """config.train: the batch, the length of the run, how the step computes, logging and evaluation."""
    t = ml_collections.ConfigDict()
    t.seed = 1337
    t.global_batch_size = 32
    t.grad_accum_steps = 1
    t.max_steps = 3000
    t.max_tokens = 0  # 0: no limit
    t.max_time_s = 0.0  # 0: no limit
    t.stop_after = 0  # end this invocation after this step (saving); the schedule still ends at max_steps
    t.dtype = "float32"  # compute dtype
    t.param_dtype = "float32"
    t.remat = "none"
    t.scan_layers = False
    # The attention kernel (model/attention.py ATTENTION_KERNELS): 'auto' picks one for the backend and
    # dtype when the run is built, and says which; an explicit one that cannot run here is refused.
    t.attention = "auto"
    t.z_loss = 0.0
    t.skip_nonfinite = False  # skip an update whose loss is not finite, instead of stopping
    # Start from these weights (fine-tuning): an export directory (scripts/export.py, convert_hf.py
    # import) or a Hugging Face model directory. Their architecture must be config.model's.
    t.init_from = ""
    t.log_every = 10
    t.eval_every = 250
    t.eval_batches = 20
    # lm-evaluation-harness tasks scored at every evaluation (the `eval` extra), e.g. 'hellaswag,arc_easy':
    # at most eval_tasks_limit documents of each, their metrics logged as task/NAME/METRIC. eval_tasks_path:
    # a folder of task YAML files of your own (local data).
    t.eval_tasks = ""
    t.eval_tasks_limit = 100
    t.eval_tasks_path = ""
    t.peak_flops = 0.0  # per device, for MFU; 0: from the device kind (CPU: measured)
    return t


def _data_defaults() -> ml_collections.ConfigDict:
    """config.data: where the text comes from, how it is tokenized and cut."""
    d = ml_collections.ConfigDict()
    d.source = "tiny_shakespeare"
    d.local_path = ""  # tiny_shakespeare: a local input.txt instead of the download
    d.download_url = tiny_shakespeare.URL  # tiny_shakespeare: where it is downloaded from (a mirror works)
    d.data_dir = ""  # where TFDS datasets are prepared and read ("" = TFDS's default); local, process 0's
    d.text_field = "text"  # tfds:NAME and .jsonl: the field holding the text
    d.val_split = "validation"  # tfds:NAME and hf:: the split used for validation
    # hf:NAME: read the dataset as a stream (its files, in order) instead of downloading it into the Hub's
    # cache first; without a validation split, the last val_fraction of its files are held out.
    d.hf_streaming = False
    # Where the tokenized splits are kept ("" = WORKDIR/data). A shared folder (gs:// works) lets runs on
    # the same data and tokenizer reuse them instead of tokenizing a large corpus again.
    d.tokens_dir = ""
    d.tokenizer = "char"
    d.seq_len = 256
    d.num_workers = 0
    # Worker processes per process that tokenize a text source's chunks (0: every core of the machine for a
    # source over 64 MB, else 1); every process of a job tokenizes its share of the chunks.
    d.prepare_workers = 0
    # A weighted mixture of sources (data/mixture.py), set in a config file: {name: {"source": ..., "weight": w,
    # and any other data key for that source}}; and weights that change at given steps: "STEP:name=w,...;...".
    d.mixture = ml_collections.ConfigDict()
    d.mixture_schedule = ""
    d.val_fraction = 0.05
    # Instruction sources (json:/jsonl:): the prompt template ('alpaca', or 'chat': the hf:DIR
    # tokenizer's chat template), and whether examples are packed into rows or padded one per row.
    d.prompt_style = "alpaca"
    d.pack = False
    # Rows that hold several documents (or packed examples) attend within each only, positions restarting
    # at 0 for each (as MaxText, Levanter and torchtitan do); False: a row is one sequence (nanoGPT's way).
    d.document_mask = True
    return d


def _preference_defaults() -> ml_collections.ConfigDict:
    """config.preference, preference tuning (train/preference.py): what a run on preference pairs (records
    with 'chosen' and 'rejected', data/preferences.py) optimises. The reference is the base with the LoRA
    adapters off, or (full tuning) a frozen copy of the initial weights (one more copy of the parameters)."""
    p = ml_collections.ConfigDict()
    p.beta = 0.1  # how far from the reference the policy may move (DPO's beta; IPO's tau)
    p.loss = "sigmoid"  # 'sigmoid': DPO; 'ipo': IPO, on the log-ratios averaged over response tokens
    p.label_smoothing = 0.0  # sigmoid: conservative DPO, the share of pairs assumed mislabelled
    return p


def _lora_defaults() -> ml_collections.ConfigDict:
    """config.lora, LoRA fine-tuning (model/lora.py): adapters of this rank on the targeted layers train, every
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
    """The ModelConfig of a run: the named preset, or with `hf:DIR` the architecture a model folder
    describes (a Hugging Face folder, a lightjax export, a PEFT adapter's base), with the other
    `config.model` keys as overrides, and config.lora's adapters (a config saved before LoRA existed has
    none)."""
    fields = {k: v for k, v in config.model.to_dict().items() if v is not None}
    name = fields.pop("name")
    lora = config.get("lora")
    if lora is not None and lora.rank:
        fields.update({field: lora[key] for field, key in _LORA_KEYS.items()})
    try:
        if name.startswith("hf:"):  # the architecture a model folder describes
            return model_config_of(name[len("hf:"):], **fields)
        return ModelConfig.from_name(name, **fields)
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise ConfigError(f"config.model.name={name!r}: {e}") from None
    except TypeError as e:  # an unknown field name
        raise ConfigError(f"config.model: {e}") from None
    except ValueError as e:
        message = str(e)
        for field, key in _LORA_KEYS.items():
            message = message.replace(f"ModelConfig.{field}=", f"config.lora.{key}=")
        raise ConfigError(message if "config.lora." in message else f"config.model: {message}") from None


# ModelConfig's LoRA fields and the config.lora keys that set them.
_LORA_KEYS = {"lora_r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_targets": "targets"}
