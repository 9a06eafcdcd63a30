"""The train and eval steps: one `jax.jit` each, with in/out shardings and the train state donated.

`step(state, batch) -> (state, metrics)`: the gradients of the loss (loss.py) over the batch, summed
over micro-batches when accumulating, divided once by the counted tokens, then the optimizer update.
They are built, with the state they update and its shardings, by train/run.py, which wraps each in a
`Step` bound to the mesh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lightjax.model import lora
from lightjax.model.gpt import GPT
from lightjax.runtime.sharding import Rules, with_mesh
from lightjax.train.loss import batch_nll, make_loss_fn


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array  # int32 scalar: the number of updates applied
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32[2] PRNG key; dropout keys are folded in from the step


@dataclasses.dataclass(frozen=True)
class Step:
    """A jitted step bound to its mesh and rules: tracing happens under them, so the model's
    logical constraints reach the compiled program."""

    fn: Any  # the jax.jit-wrapped function
    mesh: Mesh
    rules: Rules
    bound: tuple = ()  # arguments passed after the caller's (full preference tuning: the reference params)

    def __call__(self, *args: Any) -> Any:
        with with_mesh(self.mesh, self.rules):
            return self.fn(*args, *self.bound)

    def lower(self, *args: Any) -> Any:
        with with_mesh(self.mesh, self.rules):
            return self.fn.lower(*args, *self.bound)


def _split_micro(batch: Mapping[str, jax.Array], n: int) -> dict[str, jax.Array]:
    """[B, ...] -> [n, B/n, ...] with micro-batch j = rows j, j+n, j+2n, ...: each device's contiguous
    rows feed every micro-batch equally, so the split needs no communication."""
    return {k: v.reshape(v.shape[0] // n, n, *v.shape[1:]).swapaxes(0, 1) for k, v in batch.items()}


def summed_grads(grad_fn: Any, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array,
                 micro_batches: int) -> tuple[Any, Any]:
    """(gradient sums, sums of the loss function's aux values) over the batch, in `micro_batches`
    sequential parts; `grad_fn(params, batch, rng) -> ((objective, aux), grads)`, aux a tree of sums."""
    if micro_batches == 1:
        (_, aux), grads = grad_fn(params, batch, rng)
        return grads, aux

    def micro_step(carry: tuple, xs: tuple) -> tuple[tuple, None]:
        g_acc, aux_acc = carry
        micro, i = xs
        (_, aux), g = grad_fn(params, micro, jax.random.fold_in(rng, i))
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        return (g_acc, jax.tree.map(jnp.add, aux_acc, aux)), None

    xs = (_split_micro(batch, micro_batches), jnp.arange(micro_batches))
    aux_shapes = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], xs[0]), rng)[0][1]
    zeros = (jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
             jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), aux_shapes))
    (grads, aux), _ = jax.lax.scan(micro_step, zeros, xs)
    return grads, aux


def apply_update(state: TrainState, tx: optax.GradientTransformation, trained: Any, frozen: Any, grads: Any,
                 count: jax.Array, skip_nonfinite: bool = False,
                 loss: jax.Array | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """The state after the update of the summed `grads` divided once by `count` (the counted tokens or
    pairs: any split into micro-batches gives the same update), and its grad_norm (and `skipped` with
    skip_nonfinite: an update whose `loss` or gradients are not finite is not applied)."""
    denom = jnp.maximum(count, 1.0)
    with jax.named_scope("optimizer"):  # names the ops in profiles (lightjax/perf/profile.py)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grads, trained)
        updates, opt_state = tx.update(grads, state.opt_state, trained)
        params = lora.combine(optax.apply_updates(trained, updates), frozen)
        grad_norm = optax.tree.norm(grads)
    metrics = {"grad_norm": grad_norm}
    if skip_nonfinite:
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old),
                                         (params, opt_state), (state.params, state.opt_state))
        metrics["skipped"] = ~ok
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(model: GPT, tx: optax.GradientTransformation, schedule: optax.Schedule, shardings: TrainState,
                    batch_sharding: NamedSharding, grad_accum_steps: int = 1, z_loss: float = 0.0,
                    skip_nonfinite: bool = False) -> Any:
    """The jitted step(state, batch) -> (state, metrics), the state donated; metrics: loss, grad_norm,
    lr, tokens (all scalars, replicated), `attended_keys` with document masks (keys per query, for MFU),
    and `skipped` with skip_nonfinite (an update whose loss or gradients are not finite is not applied)."""
    loss_fn = make_loss_fn(model, z_loss)

    def step(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        # Gradients of the trained parameters only (LoRA: the adapters; the frozen weights get none).
        trained, frozen = lora.trainable(model.config, state.params)
        grad_fn = jax.value_and_grad(lambda p, b, r: loss_fn(lora.combine(p, frozen), b, r), has_aux=True)
        grads, (nll_sum, count) = summed_grads(grad_fn, trained, batch, rng, grad_accum_steps)
        loss = nll_sum / jnp.maximum(count, 1.0)
        state, update = apply_update(state, tx, trained, frozen, grads, count, skip_nonfinite, loss)
        metrics = {"loss": loss, "lr": schedule(state.step - 1), "tokens": count, **update}
        if "positions" in batch:  # document masks: the keys each query attends to, on average (for MFU)
            counted = batch["segment_ids"] > 0
            metrics["attended_keys"] = (jnp.sum(jnp.where(counted, batch["positions"] + 1, 0))
                                        / jnp.maximum(jnp.sum(counted), 1))
        return state, metrics

    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    return jax.jit(step, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, replicated),
                   donate_argnums=(0,))


def make_eval_step(model: GPT, param_shardings: Any, batch_sharding: NamedSharding) -> Any:
    """The jitted eval_step(params, batch) -> {nll_sum, tokens}: sums, so that a split's loss is their
    ratio."""

    def step(params: Any, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        nll_sum, _, mask = batch_nll(model, params, batch)
        return {"nll_sum": nll_sum, "tokens": jnp.sum(mask)}

    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    return jax.jit(step, in_shardings=(param_shardings, batch_sharding), out_shardings=replicated)


def synthetic_batch(rng: np.random.Generator, batch: int, seq_len: int, vocab_size: int,
                    documents: bool = False) -> dict[str, np.ndarray]:
    """Random tokens of the shape the train step takes (every target counted), for benchmarks and tests;
    with `documents`, the inputs of document-masked rows too (one document per row)."""
    out = {"tokens": rng.integers(0, vocab_size, (batch, seq_len + 1), dtype=np.int32),
           "mask": np.ones((batch, seq_len), np.int32)}
    if documents:
        out["segment_ids"] = np.ones((batch, seq_len), np.int32)
        out["positions"] = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy()
    return out
