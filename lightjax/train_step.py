"""The train state and the jitted, sharded train and eval steps.

A batch is a dict: `tokens` [B, T+1] int32 (inputs are tokens[:, :-1], targets tokens[:, 1:]) and an
optional `mask` [B, T] (1 where the target counts; 0 for padding). The loss is the mean next-token
cross-entropy over counted targets, computed in float32 over the padded vocabulary.

Shardings come from the logical names the model gives its parameters (see sharding.py): the train
state is created directly sharded (init runs under jit with out_shardings, so no device ever holds
the whole model), and the step is one `jax.jit` with in/out shardings and the state donated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lightjax.config import ModelConfig
from lightjax.model import GPT, stack_layers
from lightjax.optim import check_no_decay, lr_schedule, make_optimizer
from lightjax.run_config import DTYPES, ConfigError, validate
from lightjax.sharding import Rules, batch_sharding, logical_to_sharding, make_mesh, resolve_rules, with_mesh


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 scalar: the number of updates applied
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2] PRNG key; dropout keys are folded in from the step


def build_model(cfg: ModelConfig, train: Mapping[str, Any]) -> GPT:
    return GPT(cfg, dtype=DTYPES[train["dtype"]], param_dtype=DTYPES[train["param_dtype"]],
               scan_layers=train["scan_layers"], remat=train["remat"])


def _init_fn(model: GPT, tx: optax.GradientTransformation, batch: int, seq_len: int) -> Callable:
    def init(rng: jax.Array) -> TrainState:
        params = model.init(rng, jnp.zeros((batch, seq_len), jnp.int32))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)

    return init


def _init_batch(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]  # any batch size divisible by the batch shards


# The shape of a PRNG key, for tracing init without creating one: nothing runs eagerly on the mesh, so
# shapes and shardings also come out for devices that can only compile (TPU topologies on a laptop).
_ABSTRACT_KEY = jax.ShapeDtypeStruct((2,), jnp.uint32)


def state_shardings(model: GPT, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules,
                    seq_len: int) -> TrainState:
    """NamedShardings of every leaf of the train state, from the parameters' logical names.
    The optimizer moments inherit their parameter's names (optax maps over the boxed tree)."""
    init = _init_fn(model, tx, _init_batch(mesh), seq_len)
    with with_mesh(mesh, rules):
        boxed = jax.eval_shape(init, _ABSTRACT_KEY)
    return logical_to_sharding(boxed, mesh, rules)


def create_train_state(model: GPT, tx: optax.GradientTransformation, mesh: Mesh, rules: Rules, seed: int,
                       seq_len: int) -> tuple[TrainState, TrainState]:
    """(state, its shardings): parameters initialised directly into their shards."""
    shardings = state_shardings(model, tx, mesh, rules, seq_len)
    init = _init_fn(model, tx, _init_batch(mesh), seq_len)
    with with_mesh(mesh, rules):
        state = jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=shardings)(jax.random.PRNGKey(seed))
    return state, shardings


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token negative log-likelihood over counted positions, and log-sum-exp per position."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((lse - target_logit) * mask), lse


@dataclasses.dataclass(frozen=True)
class Step:
    """A jitted step bound to its mesh and rules: tracing happens under them, so the model's
    logical constraints reach the compiled program."""

    fn: Any  # the jax.jit-wrapped function
    mesh: Mesh
    rules: Rules

    def __call__(self, *args: Any) -> Any:
        with with_mesh(self.mesh, self.rules):
            return self.fn(*args)

    def lower(self, *args: Any) -> Any:
        with with_mesh(self.mesh, self.rules):
            return self.fn.lower(*args)


def _split_micro(batch: Mapping[str, jax.Array], n: int) -> dict[str, jax.Array]:
    """[B, ...] -> [n, B/n, ...] with micro-batch j = rows j, j+n, j+2n, ...: each device's contiguous
    rows feed every micro-batch equally, so the split needs no communication."""
    return {k: v.reshape(v.shape[0] // n, n, *v.shape[1:]).swapaxes(0, 1) for k, v in batch.items()}


def make_loss_fn(model: GPT, z_loss: float = 0.0) -> Callable:
    """loss_fn(params, batch, rng) -> (objective, (nll_sum, counted_tokens)): sums, not means, so that
    micro-batches and devices add up exactly; dropout is active when the model has any."""
    use_dropout = model.config.dropout > 0

    def loss_fn(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, tuple]:
        tokens = batch["tokens"]
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        mask = batch["mask"].astype(jnp.float32) if "mask" in batch else jnp.ones(targets.shape, jnp.float32)
        logits = model.apply({"params": params}, inputs, deterministic=not use_dropout, rngs={"dropout": rng})
        nll_sum, lse = cross_entropy(logits, targets, mask)
        # z-loss (PaLM) keeps log Z near 0 so that bfloat16 logits stay in range.
        objective = nll_sum + z_loss * jnp.sum(jnp.square(lse) * mask)
        return objective, (nll_sum, jnp.sum(mask))

    return loss_fn


def make_train_step(model: GPT, tx: optax.GradientTransformation, schedule: optax.Schedule, mesh: Mesh,
                    rules: Rules, shardings: TrainState, grad_accum_steps: int = 1, z_loss: float = 0.0,
                    skip_nonfinite: bool = False) -> Step:
    """step(state, batch) -> (state, metrics); metrics: loss, grad_norm, lr, tokens (all scalars), and
    `skipped` with skip_nonfinite (an update whose loss or gradients are not finite is not applied)."""
    grad_fn = jax.value_and_grad(make_loss_fn(model, z_loss), has_aux=True)

    def step(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        if grad_accum_steps == 1:
            (_, (nll_sum, count)), grads = grad_fn(state.params, batch, rng)
        else:
            def micro_step(carry: tuple, xs: tuple) -> tuple[tuple, None]:
                g_acc, nll_acc, n_acc = carry
                micro, i = xs
                (_, (nll, n)), g = grad_fn(state.params, micro, jax.random.fold_in(rng, i))
                g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
                return (g_acc, nll_acc + nll, n_acc + n), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            xs = (_split_micro(batch, grad_accum_steps), jnp.arange(grad_accum_steps))
            (grads, nll_sum, count), _ = jax.lax.scan(micro_step, (zeros, 0.0, 0.0), xs)
        # Sums over all counted tokens, divided once: any split into micro-batches gives the same update.
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": nll_sum / denom, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step),
                   "tokens": count}
        if skip_nonfinite:
            ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
            params, opt_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old),
                                             (params, opt_state), (state.params, state.opt_state))
            metrics["skipped"] = ~ok
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    fn = jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, replicated),
                 donate_argnums=(0,))
    return Step(fn, mesh, rules)


def make_eval_step(model: GPT, mesh: Mesh, rules: Rules, shardings: TrainState) -> Step:
    """eval_step(params, batch) -> {nll_sum, tokens}: sums, so that a split's loss is their ratio."""

    def step(params: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        tokens = batch["tokens"]
        targets = tokens[:, 1:]
        mask = batch["mask"].astype(jnp.float32) if "mask" in batch else jnp.ones(targets.shape, jnp.float32)
        logits = model.apply({"params": params}, tokens[:, :-1])
        nll_sum, _ = cross_entropy(logits, targets, mask)
        return {"nll_sum": nll_sum, "tokens": jnp.sum(mask)}

    replicated = NamedSharding(mesh, PartitionSpec())
    fn = jax.jit(step, in_shardings=(shardings.params, batch_sharding(mesh)), out_shardings=replicated)
    return Step(fn, mesh, rules)


def synthetic_batch(rng: np.random.Generator, batch: int, seq_len: int, vocab_size: int) -> dict[str, np.ndarray]:
    """Random tokens of the shape the train step takes, for benchmarks and tests."""
    return {"tokens": rng.integers(0, vocab_size, (batch, seq_len + 1), dtype=np.int32)}


@dataclasses.dataclass(frozen=True)
class Training:
    """Everything a run's config builds before the first step."""

    model_config: ModelConfig
    mesh: Mesh
    rules: Rules
    model: GPT
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    shardings: TrainState
    train_step: Step
    eval_step: Step
    seed: int
    seq_len: int

    def init_state(self, pretrained: Any = None) -> TrainState:
        """A freshly initialised train state, created directly in its shards. `pretrained` parameters
        (loop layout, host arrays, this model's shapes) replace the initial ones, cast to the run's
        param_dtype and placed in the same shards; the optimizer state starts fresh either way."""
        state, _ = create_train_state(self.model, self.tx, self.mesh, self.rules, self.seed, self.seq_len)
        if pretrained is None:
            return state
        if self.model.scan_layers:
            pretrained = stack_layers(pretrained, self.model_config.n_layer)
        params = jax.tree.map(lambda p, like, s: jax.device_put(np.asarray(p).astype(like.dtype), s),
                              pretrained, state.params, self.shardings.params)
        return state.replace(params=params)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the train state, allocating nothing: a restore target."""
        init = _init_fn(self.model, self.tx, _init_batch(self.mesh), self.seq_len)
        with with_mesh(self.mesh, self.rules):
            shapes = jax.eval_shape(lambda rng: nn.unbox(init(rng)), _ABSTRACT_KEY)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, self.shardings)


def setup_training(config: Any, devices: list[jax.Device] | None = None) -> Training:
    """Validate the run config, then build mesh, model, optimizer, the state's shardings and the
    jitted steps. Raises ConfigError (one line, naming the key) on bad settings."""
    devices = list(jax.devices() if devices is None else devices)
    cfg = validate(config, len(devices))
    mesh = make_mesh(config.mesh, devices)
    rules = resolve_rules(config.mesh.rules)
    model = build_model(cfg, config.train)
    tx = make_optimizer(config.optim, config.train.max_steps)
    schedule = lr_schedule(config.optim, config.train.max_steps)
    shardings = state_shardings(model, tx, mesh, rules, config.data.seq_len)
    try:
        check_no_decay(config.optim.no_decay, shardings.params)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    train_step = make_train_step(model, tx, schedule, mesh, rules, shardings, config.train.grad_accum_steps,
                                 config.train.z_loss, config.train.skip_nonfinite)
    eval_step = make_eval_step(model, mesh, rules, shardings)
    return Training(cfg, mesh, rules, model, tx, schedule, shardings, train_step, eval_step, config.train.seed,
                    config.data.seq_len)
