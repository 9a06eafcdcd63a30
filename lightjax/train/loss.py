"""The loss, shared by training and evaluation: next-token cross-entropy over the counted targets.

A batch is a dict: `tokens` [B, T+1] int32 (inputs are tokens[:, :-1], targets tokens[:, 1:]), an
optional `mask` [B, T] (1 where the target counts; 0 for padding), and with document masks the inputs'
`segment_ids` and `positions` [B, T] (data/rows.py). Losses are kept as sums over the
counted targets, with their count beside them, so that micro-batches, devices and evaluation batches
add up exactly; a mean is taken once, at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lightjax.model.gpt import GPT


def targets_and_mask(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(targets [B, T], float32 mask [B, T]): every target counts unless the batch has a mask."""
    targets = batch["tokens"][:, 1:]
    if "mask" in batch:
        return targets, batch["mask"].astype(jnp.float32)
    return targets, jnp.ones(targets.shape, jnp.float32)


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token negative log-likelihood over counted positions, and log-sum-exp per position.
    Computed in float32 over the padded vocabulary."""
    with jax.named_scope("loss"):  # names the ops in profiles (lightjax/perf/profile.py)
        logits = logits.astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return jnp.sum((lse - target_logit) * mask), lse


def batch_nll(model: GPT, params: Any, batch: Mapping[str, jax.Array],
              rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(summed NLL, log-sum-exp [B, T], mask [B, T]) of a batch. With `rng` dropout is active (when
    the model has any); without it the forward pass is deterministic, as evaluation needs."""
    targets, mask = targets_and_mask(batch)
    inputs = (batch["tokens"][:, :-1], batch.get("positions"))
    segments = batch.get("segment_ids")  # rows holding several documents attend within each
    if rng is None:
        logits = model.apply({"params": params}, *inputs, segment_ids=segments)
    else:
        logits = model.apply({"params": params}, *inputs, deterministic=model.config.dropout == 0,
                             segment_ids=segments, rngs={"dropout": rng})
    nll_sum, lse = cross_entropy(logits, targets, mask)
    return nll_sum, lse, mask


def make_loss_fn(model: GPT, z_loss: float = 0.0) -> Callable:
    """loss_fn(params, batch, rng) -> (objective, (nll_sum, counted_tokens)): the objective the
    gradients are taken of, and the sums the reported loss is made of."""

    def loss_fn(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, tuple]:
        nll_sum, lse, mask = batch_nll(model, params, batch, rng)
        # z-loss (PaLM) keeps log Z near 0 so that bfloat16 logits stay in range.
        objective = nll_sum + z_loss * jnp.sum(jnp.square(lse) * mask)
        return objective, (nll_sum, jnp.sum(mask))

    return loss_fn
