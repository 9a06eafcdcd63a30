"""What scripts/serve.py serves: the model loaded as generate.py and evaluate.py load it, its parameters
placed on a (data, 1, tensor) mesh by their logical axes (the default rules: heads and MLP over tensor, so a
model larger than one device serves from several; the cache's slots over data), and its chat format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from lightjax.runtime.sharding import RULE_SETS, logical_to_sharding, make_mesh
from lightjax.serve.chat import Chat, chat_format, tokenizer_folder
from lightjax.serve.engine import Engine
from lightjax.train.load import load_model


def place_params(model: Any, params: Any, mesh: Any, rules: Any) -> Any:
    """The parameters laid out on `mesh` as training lays them out under `rules`."""
    tokens = jax.ShapeDtypeStruct((1, min(8, model.config.block_size)), jnp.int32)
    boxed = jax.eval_shape(lambda t: model.init(jax.random.key(0), t), tokens)["params"]
    return jax.device_put(params, logical_to_sharding(boxed, mesh, rules))


def build_engine(workdir: str | None = None, step: int | str | None = None, hf_dir: str | None = None,
                 export_dir: str | None = None, slots: int = 8, max_len: int | None = None, max_queue: int = 64,
                 policy: str = "continuous", data: int = 1, tensor: int = 1,
                 name: str | None = None) -> tuple[Engine, str, Chat | None, str]:
    """(the engine, not started; the model's name in the API; its chat format or None; why none)."""
    devices = jax.devices()
    if data * tensor > len(devices):
        raise ValueError(f"--data={data} x --tensor={tensor} needs {data * tensor} devices; there are {len(devices)}.")
    if slots % data:
        raise ValueError(f"--slots={slots} must be a multiple of --data={data} (each device holds the same number).")
    loaded = load_model(workdir, step, hf_dir, export_dir)
    mesh = make_mesh({"data": data, "fsdp": 1, "tensor": tensor}, devices[: data * tensor])
    rules = RULE_SETS["default"]
    params = place_params(loaded.model, loaded.params, mesh, rules)
    chat, why = chat_format(loaded, tokenizer_folder(hf_dir, export_dir))
    engine = Engine(loaded.model, params, loaded.tokenizer, slots, max_len, max_queue, policy, mesh, rules)
    return engine, name or Path(workdir or hf_dir or export_dir).resolve().name, chat, why
