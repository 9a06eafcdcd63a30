"""Build a run from its config, once: mesh, model, optimizer, the train state's shapes and
shardings, the jitted steps; `Run.init_state` then creates the state directly in its shards.

The shardings come from the logical names the model gives its parameters (runtime/sharding.py maps them
onto the mesh): init is traced once with `eval_shape`, its boxed result gives every leaf's
NamedSharding, and the real init runs under `jax.jit` with those as out_shardings, so no device ever
holds the whole model. The optimizer moments inherit their parameter's names (optax maps over the
boxed tree).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from lightjax.data.preferences import is_preference_source
from lightjax.model import lora
from lightjax.model.attention import resolve_attention
from lightjax.model.config import ModelConfig
from lightjax.model.gpt import GPT, stack_layers
from lightjax.runtime.sharding import Rules, batch_sharding, logical_to_sharding, make_mesh, resolve_rules, with_mesh
from lightjax.train.config import ConfigError, resolve_model_config
from lightjax.train.optim import check_no_decay, lr_schedule, make_optimizer
from lightjax.train.preference import make_preference_eval_step, make_preference_step
from lightjax.train.step import Step, TrainState, make_eval_step, make_train_step
from lightjax.train.validate import validate

# The shape of a PRNG key, for tracing init without creating one: nothing runs eagerly on the mesh, so
# shapes and shardings also come out for devices that can only compile (TPU topologies on a laptop).
_ABSTRACT_KEY = jax.ShapeDtypeStruct((2,), jnp.uint32)


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything a run's config builds before the first step."""

    mesh: Mesh
    rules: Rules
    model: GPT  # model.config is the run's ModelConfig
    abstract_state: TrainState  # shapes, dtypes and shardings of every leaf; allocates nothing
    train_step: Step
    eval_step: Step
    init_fn: Callable[[jax.Array], TrainState]  # rng -> the initial state, logically boxed
    seed: int
    attention_why: str  # why model.attention is the kernel it is ('as configured', 'auto: CPU', ...)
    preference: bool = False  # preference tuning (train/preference.py), not next-token prediction

    @property
    def needs_reference(self) -> bool:
        """Whether the steps take the frozen reference parameters (`with_reference`): full preference tuning."""
        return self.preference and not self.model.config.lora_r

    def with_reference(self, params: Any) -> Run:
        """This run with its steps bound to the reference parameters (placed as the state's)."""
        return dataclasses.replace(self, train_step=dataclasses.replace(self.train_step, bound=(params,)),
                                   eval_step=dataclasses.replace(self.eval_step, bound=(params,)))

    @property
    def shardings(self) -> TrainState:
        return jax.tree.map(lambda x: x.sharding, self.abstract_state)

    def init_state(self, pretrained: Any = None, adapters: Any = None) -> TrainState:
        """A freshly initialised train state, created directly in its shards. `pretrained` parameters
        (loop layout, host arrays, this model's shapes) replace the initial ones, and `adapters` (LoRA's,
        likewise) the fresh adapters, cast to the run's dtypes and placed in the same shards; the optimizer
        state starts fresh either way."""
        with with_mesh(self.mesh, self.rules):
            init = jax.jit(lambda rng: nn.unbox(self.init_fn(rng)), out_shardings=self.shardings)
            state = init(jax.random.PRNGKey(self.seed))
        if pretrained is None:
            return state
        fresh_adapters, base = lora.split(self.abstract_state.params)
        params = self._placed(pretrained, base)
        adapters = lora.split(state.params)[0] if adapters is None else self._placed(adapters, fresh_adapters)
        return state.replace(params=lora.combine(adapters, params))

    def _placed(self, tree: Any, like: Any) -> Any:
        """Host arrays in loop layout, laid out and placed as `like` (abstract, this run's layout)."""
        if self.model.scan_layers:
            tree = stack_layers(tree, self.model.config.n_layer)
        return jax.tree.map(lambda p, x: jax.device_put(np.asarray(p).astype(x.dtype), x.sharding), tree, like)


def attention_kernel(cfg: ModelConfig, train: Mapping[str, Any], backend: str | None = None,
                     segments: bool = False, seq_len: int | None = None) -> tuple[str, str]:
    """(the attention kernel config.train.attention asks for, resolved for `backend` (default JAX's), the
    compute dtype, `segments` (document masks) and `seq_len`; why that one). ConfigError, one line, if an
    explicit kernel cannot run there."""
    try:
        return resolve_attention(train.get("attention", "auto"), cfg, jnp.dtype(train["dtype"]), backend, segments,
                                 seq_len)
    except ValueError as e:
        raise ConfigError(f"config.train.attention: {e}") from None


def build_model(cfg: ModelConfig, train: Mapping[str, Any], kernel: str | None = None) -> GPT:
    """The GPT of `cfg` as config.train asks for it: dtypes, layer layout, remat policy, attention kernel
    (`kernel`, already resolved, or config.train.attention's for JAX's backend)."""
    return GPT(cfg, dtype=jnp.dtype(train["dtype"]), param_dtype=jnp.dtype(train["param_dtype"]),
               scan_layers=train["scan_layers"], remat=train["remat"],
               attention=kernel or attention_kernel(cfg, train)[0])


def _init_fn(model: GPT, tx: optax.GradientTransformation, mesh: Mesh, seq_len: int) -> Callable:
    batch = mesh.shape["data"] * mesh.shape["fsdp"]  # any batch size divisible by the batch shards

    def init(rng: jax.Array) -> TrainState:
        params = model.init(rng, jnp.zeros((batch, seq_len), jnp.int32))["params"]
        opt_state = tx.init(lora.trainable(model.config, params)[0])  # LoRA: the adapters' state only
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, rng=rng)

    return init


def build_run(config: Any, devices: list[jax.Device] | None = None) -> Run:
    """Validate the run config, then build the model, the optimizer, the mesh, the state's shardings
    and the jitted steps. Raises ConfigError (one line, naming the key) on bad settings."""
    devices = list(jax.devices() if devices is None else devices)
    validate(config, len(devices))
    t = config.train
    cfg = resolve_model_config(config)
    kernel, attention_why = attention_kernel(cfg, t, devices[0].platform, config.data.get("document_mask", False),
                                             config.data.seq_len)
    model = build_model(cfg, t, kernel)
    tx, schedule = make_optimizer(config.optim, t.max_steps), lr_schedule(config.optim, t.max_steps)
    mesh, rules = make_mesh(config.mesh, devices), resolve_rules(config.mesh.rules)
    init_fn = _init_fn(model, tx, mesh, config.data.seq_len)
    with with_mesh(mesh, rules):
        boxed = jax.eval_shape(init_fn, _ABSTRACT_KEY)
    shardings, batch = logical_to_sharding(boxed, mesh, rules), batch_sharding(mesh)
    abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  nn.unbox(boxed), shardings)
    try:
        check_no_decay(config.optim.no_decay, shardings.params)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    preference = is_preference_source(config.data.source)
    if preference:  # pairs of chosen and rejected responses: their objective (train/preference.py)
        settings = dict(config.preference)
        train_step = make_preference_step(model, tx, schedule, shardings, batch, settings, t.grad_accum_steps,
                                          t.skip_nonfinite)
        eval_step = make_preference_eval_step(model, shardings.params, batch, settings)
    else:
        train_step = make_train_step(model, tx, schedule, shardings, batch, t.grad_accum_steps, t.z_loss,
                                     t.skip_nonfinite)
        eval_step = make_eval_step(model, shardings.params, batch)
    return Run(mesh, rules, model, abstract_state, Step(train_step, mesh, rules), Step(eval_step, mesh, rules),
               init_fn, t.seed, attention_why, preference)
