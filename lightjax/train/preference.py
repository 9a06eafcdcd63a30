"""Preference tuning: the DPO objective (Rafailov et al. 2023) and IPO (Azar et al. 2023) on rows holding a
chosen/rejected pair (data/preferences.py), with the metrics TRL's DPOTrainer logs.

A pair's log-likelihoods come from one forward pass over its row (each side its own document): the summed
log-probabilities of the chosen and of the rejected response tokens, under the policy and under the
reference. With the log-ratios r_c = log pi(chosen) - log ref(chosen) and r_r likewise:

- sigmoid (DPO): -log sigmoid(beta (r_c - r_r)); with label_smoothing e, the conservative form
  -(1 - e) log sigmoid(beta d) - e log sigmoid(-beta d) (cDPO, as TRL's sigmoid loss had it).
- ipo: ((r_c / n_c - r_r / n_r) - 1 / (2 beta))^2, each log-ratio averaged over its response's tokens
  (TRL's normalisation, which the IPO authors confirmed).

Rewards are beta times the log-ratios; a pair is an accurate one when the chosen reward is the larger.
Every quantity is kept as a sum over pairs beside the pair count, so that micro-batches and devices add
up exactly, as the next-token loss does (loss.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from lightjax.model import lora
from lightjax.model.gpt import GPT
from lightjax.train.step import TrainState, apply_update, summed_grads

PREFERENCE_LOSSES = ("sigmoid", "ipo")


def response_logps(model: GPT, params: Any, batch: Mapping[str, jax.Array],
                   rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) [B]: each row's summed log-probabilities of its chosen and rejected response
    tokens (float32). With `rng` dropout is active (when the model has any)."""
    inputs, targets = batch["tokens"][:, :-1], batch["tokens"][:, 1:]
    kwargs = {"segment_ids": batch["segment_ids"]}
    if rng is not None:
        kwargs.update(deterministic=model.config.dropout == 0, rngs={"dropout": rng})
    logits = model.apply({"params": params}, inputs, batch["positions"], **kwargs).astype(jnp.float32)
    logp = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)
    return (jnp.sum(logp * batch["chosen_mask"], axis=-1), jnp.sum(logp * batch["rejected_mask"], axis=-1))


def pair_losses(policy: tuple[jax.Array, jax.Array], reference: tuple[jax.Array, jax.Array],
                lengths: tuple[jax.Array, jax.Array], beta: float, loss: str = "sigmoid",
                label_smoothing: float = 0.0) -> jax.Array:
    """Each pair's loss [B] from the (chosen, rejected) log-likelihoods of the policy and the reference
    and the responses' token counts."""
    chosen_ratio, rejected_ratio = policy[0] - reference[0], policy[1] - reference[1]
    if loss == "sigmoid":
        d = beta * (chosen_ratio - rejected_ratio)
        return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(d) - label_smoothing * jax.nn.log_sigmoid(-d)
    if loss == "ipo":
        d = chosen_ratio / jnp.maximum(lengths[0], 1.0) - rejected_ratio / jnp.maximum(lengths[1], 1.0)
        return jnp.square(d - 1.0 / (2.0 * beta))
    raise ValueError(f"config.preference.loss={loss!r} is not one of {', '.join(PREFERENCE_LOSSES)}.")


def pair_sums(policy: tuple[jax.Array, jax.Array], reference: tuple[jax.Array, jax.Array], beta: float,
              counted: jax.Array) -> dict[str, jax.Array]:
    """TRL's metrics as sums over the counted pairs (`counted` [B], 0 for padding rows): rewards/chosen,
    rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen, logps/rejected."""
    chosen_reward = beta * (policy[0] - reference[0])
    rejected_reward = beta * (policy[1] - reference[1])
    per_pair = {"rewards/chosen": chosen_reward, "rewards/rejected": rejected_reward,
                "rewards/margins": chosen_reward - rejected_reward,
                "rewards/accuracies": (chosen_reward > rejected_reward).astype(jnp.float32),
                "logps/chosen": policy[0], "logps/rejected": policy[1]}
    return {k: jnp.sum(jax.lax.stop_gradient(v) * counted) for k, v in per_pair.items()}


def _lengths(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    return (jnp.sum(batch["chosen_mask"], axis=-1).astype(jnp.float32),
            jnp.sum(batch["rejected_mask"], axis=-1).astype(jnp.float32))


def adapters_off(params: Any) -> Any:
    """A LoRA model's parameters with every adapter zeroed: the frozen base model, computed exactly (the
    adapters' branch adds zeros), without a second copy of its weights."""
    adapters, base = lora.split(params)
    return lora.combine(jax.tree.map(jnp.zeros_like, adapters), base)


def preference_sums(model: GPT, params: Any, reference: Any, batch: Mapping[str, jax.Array],
                    settings: Mapping[str, Any]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(the summed loss of the batch's pairs, {loss, pairs, and TRL's metrics} as sums) for the policy
    `params` against the `reference` parameters (held fixed: no gradient reaches them). Dropout is off in
    both, as TRL's DPOTrainer has it by default. A row without both responses (padding) counts for nothing."""
    policy = response_logps(model, params, batch)
    ref = jax.lax.stop_gradient(response_logps(model, reference, batch))
    lengths = _lengths(batch)
    counted = ((lengths[0] > 0) & (lengths[1] > 0)).astype(jnp.float32)
    losses = pair_losses(policy, ref, lengths, settings["beta"], settings["loss"],
                         settings.get("label_smoothing", 0.0)) * counted
    return jnp.sum(losses), {"loss": jnp.sum(losses), "pairs": jnp.sum(counted),
                             **pair_sums(policy, ref, settings["beta"], counted)}


def make_preference_step(model: GPT, tx: optax.GradientTransformation, schedule: optax.Schedule,
                         shardings: Any, batch_sharding: NamedSharding, settings: Mapping[str, Any],
                         grad_accum_steps: int = 1, skip_nonfinite: bool = False) -> Any:
    """The jitted step of preference tuning, the state donated: step(state, batch) for a LoRA run, whose
    reference is its own base with the adapters off; step(state, batch, reference) for full tuning, the
    frozen reference parameters laid out as the state's. Metrics: loss (per pair), pairs, grad_norm, lr,
    and TRL's rewards/... and logps/... (means over the pairs)."""

    def step(state: TrainState, batch: Mapping[str, jax.Array], reference: Any) -> tuple[TrainState, dict]:
        trained, frozen = lora.trainable(model.config, state.params)
        ref = adapters_off(state.params) if reference is None else reference
        grad_fn = jax.value_and_grad(
            lambda p, b, _: preference_sums(model, lora.combine(p, frozen), ref, b, settings), has_aux=True)
        grads, sums = summed_grads(grad_fn, trained, batch, state.rng, grad_accum_steps)
        pairs = jnp.maximum(sums["pairs"], 1.0)
        metrics = {k: v / pairs for k, v in sums.items() if k != "pairs"}
        state, update = apply_update(state, tx, trained, frozen, grads, sums["pairs"], skip_nonfinite,
                                     metrics["loss"])
        return state, {**metrics, "pairs": sums["pairs"], "lr": schedule(state.step - 1), **update}

    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    if model.config.lora_r:
        return jax.jit(lambda state, batch: step(state, batch, None), in_shardings=(shardings, batch_sharding),
                       out_shardings=(shardings, replicated), donate_argnums=(0,))
    return jax.jit(step, in_shardings=(shardings, batch_sharding, shardings.params),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))


def make_preference_eval_step(model: GPT, param_shardings: Any, batch_sharding: NamedSharding,
                              settings: Mapping[str, Any]) -> Any:
    """The jitted eval_step(params, batch[, reference]) -> preference_sums' sums (loss, pairs, TRL's
    metrics), replicated; the reference argument as make_preference_step's."""

    def step(params: Any, batch: Mapping[str, jax.Array], reference: Any) -> dict[str, jax.Array]:
        ref = adapters_off(params) if reference is None else reference
        return preference_sums(model, params, ref, batch, settings)[1]

    replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
    if model.config.lora_r:
        return jax.jit(lambda params, batch: step(params, batch, None), in_shardings=(param_shardings, batch_sharding),
                       out_shardings=replicated)
    return jax.jit(step, in_shardings=(param_shardings, batch_sharding, param_shardings), out_shardings=replicated)
