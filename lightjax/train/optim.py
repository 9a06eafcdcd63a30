"""The optimizer: learning-rate schedule, global-norm clipping and AdamW with a weight-decay mask."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

SCHEDULES = ("cosine", "constant", "linear", "wsd")


def lr_schedule(optim: Mapping[str, Any], max_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then:

    cosine:   cosine decay to `min_lr` at `max_steps` (nanoGPT, LitGPT pretraining)
    linear:   linear decay to `min_lr` at `max_steps`
    constant: `lr` until the end
    wsd:      warmup-stable-decay: `lr` until the last `decay_fraction` of the steps, then linear to `min_lr`
    """
    lr, min_lr, warmup = optim["lr"], optim["min_lr"], optim["warmup_steps"]
    name = optim["schedule"]
    warmup_fn = optax.linear_schedule(0.0, lr, max(warmup, 1))
    rest = max(max_steps - warmup, 1)
    if name == "cosine":
        after = optax.cosine_decay_schedule(lr, rest, alpha=min_lr / lr)
    elif name == "linear":
        after = optax.linear_schedule(lr, min_lr, rest)
    elif name == "constant":
        after = optax.constant_schedule(lr)
    elif name == "wsd":
        decay = max(int(round(optim["decay_fraction"] * max_steps)), 1)
        stable = max(rest - decay, 0)
        after = optax.join_schedules(
            [optax.constant_schedule(lr), optax.linear_schedule(lr, min_lr, decay)], [stable])
    else:
        raise ValueError(f"config.optim.schedule={name!r} is not one of {', '.join(SCHEDULES)}.")
    if warmup == 0:
        return after
    return optax.join_schedules([warmup_fn, after], [warmup])


def decay_mask(params: Any, no_decay: tuple[str, ...]) -> Any:
    """True for the parameters that get weight decay: all but those whose own name is in `no_decay`
    (by default biases, norm scales and embeddings, as in LitGPT and nanoGPT)."""

    def decays(path: tuple, _: Any) -> bool:
        # The last dict key is the parameter's own name (boxed parameters add an attribute key after it).
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return keys[-1] not in no_decay

    return jax.tree_util.tree_map_with_path(decays, params)


# Parameter names of the layers (layers.py): a model may lack some (Llama has no biases).
PARAMETER_NAMES = ("kernel", "bias", "scale", "embedding", "lora_a", "lora_b")


def check_no_decay(no_decay: Any, params: Any) -> None:
    """A ValueError unless every name in `no_decay` is a layer parameter's name or one of this model's
    (a typo would silently decay everything)."""
    names = {[k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
             for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]} | set(PARAMETER_NAMES)
    unknown = [n for n in tuple(no_decay) if n not in names]
    if unknown:
        raise ValueError(f"config.optim.no_decay={tuple(no_decay)!r} names no parameter of this model: "
                         f"{', '.join(map(repr, unknown))}; its parameter names are {', '.join(sorted(names))}.")


def make_optimizer(optim: Mapping[str, Any], max_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm(clip_norm) -> AdamW(schedule, b1, b2, eps, weight_decay, mask)."""
    no_decay = tuple(optim["no_decay"])
    adamw = optax.adamw(
        learning_rate=lr_schedule(optim, max_steps), b1=optim["b1"], b2=optim["b2"], eps=optim["eps"],
        weight_decay=optim["weight_decay"], mask=lambda params: decay_mask(params, no_decay),
    )
    if optim["clip_norm"] > 0:
        return optax.chain(optax.clip_by_global_norm(optim["clip_norm"]), adamw)
    return adamw
