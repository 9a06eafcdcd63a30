import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lightjax.train.config import default_config
from lightjax.train.optim import decay_mask, lr_schedule, make_optimizer


def _optim(schedule, **kw):
    o = default_config().optim
    o.lr, o.min_lr, o.warmup_steps, o.schedule, o.decay_fraction = 1e-3, 1e-4, 100, schedule, 0.2
    for k, v in kw.items():
        setattr(o, k, v)
    return o


@pytest.mark.parametrize("schedule,points", [
    # (step, lr): warmup midpoint, warmup end, middle of the decay, the end.
    ("cosine", [(50, 5e-4), (100, 1e-3), (550, 5.5e-4), (1000, 1e-4)]),
    ("linear", [(50, 5e-4), (100, 1e-3), (550, 5.5e-4), (1000, 1e-4)]),
    ("constant", [(50, 5e-4), (100, 1e-3), (550, 1e-3), (1000, 1e-3)]),
    # warmup-stable-decay: stable until the last 20% (step 800), then linear to min_lr.
    ("wsd", [(50, 5e-4), (100, 1e-3), (799, 1e-3), (900, 5.5e-4), (1000, 1e-4)]),
])
def test_schedules(schedule, points):
    fn = lr_schedule(_optim(schedule), max_steps=1000)
    assert float(fn(0)) == 0.0
    for step, want in points:
        assert float(fn(step)) == pytest.approx(want, rel=1e-5), step


def test_no_warmup_starts_at_lr():
    assert float(lr_schedule(_optim("cosine", warmup_steps=0), 1000)(0)) == pytest.approx(1e-3)


def test_weight_decay_skips_biases_norms_and_embeddings():
    params = {"wte": {"embedding": jnp.ones((4, 2))}, "h_0": {"fc": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
                                                             "norm_1": {"scale": jnp.ones(2)}}}
    mask = decay_mask(params, ("bias", "scale", "embedding"))
    assert mask == {"wte": {"embedding": False}, "h_0": {"fc": {"kernel": True, "bias": False},
                                                        "norm_1": {"scale": False}}}
    o = _optim("constant", warmup_steps=0, weight_decay=0.1)
    tx = make_optimizer(o, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)  # no gradient: only weight decay moves anything
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["h_0"]["fc"]["kernel"], 1 - 1e-3 * 0.1, rtol=1e-6)
    for leaf in (new["wte"]["embedding"], new["h_0"]["fc"]["bias"], new["h_0"]["norm_1"]["scale"]):
        np.testing.assert_array_equal(leaf, 1.0)
    # Switchable: with no exclusions everything decays.
    assert all(jax.tree.leaves(decay_mask(params, ())))


@pytest.mark.parametrize("clip_norm", [1.0, 0.0])
def test_clipping_bounds_the_update(clip_norm):
    """AdamW's first step ignores the gradient's scale, so the clipping is read off its first moment:
    (1 - b1) x the clipped gradient (with clip_norm 0: the gradient as it is)."""
    o = _optim("constant", warmup_steps=0, weight_decay=0.0, clip_norm=clip_norm)
    tx = make_optimizer(o, 10)
    params = {"w": jnp.zeros(4)}
    grads = {"w": jnp.array([300.0, 400.0, 0.0, 0.0])}  # global norm 500
    _, state = tx.update(grads, tx.init(params), params)
    mu = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)][0].mu["w"]
    scale = 1.0 / 500.0 if clip_norm else 1.0
    np.testing.assert_allclose(mu, (1 - o.b1) * scale * np.array([300.0, 400.0, 0.0, 0.0]), rtol=1e-6)
