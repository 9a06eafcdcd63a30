"""The mixture-of-experts layer's grouped dispatch (each expert over the tokens that picked it) against
the dense one (every expert over every token): the same logits and gradients, on one device and on a
mesh."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from lightjax.model.gpt import GPT
from lightjax.runtime.sharding import RULE_SETS, logical_to_sharding, make_mesh, with_mesh
from tests.helpers import tiny_preset


@functools.cache
def _mixtral():
    cfg = tiny_preset("Mixtral-8x7B-v0.1")
    params = nn.unbox(jax.jit(GPT(cfg).init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    return cfg, params


def _loss(cfg, params, tokens):
    return jnp.mean(GPT(cfg).apply({"params": params}, tokens) ** 2)


@pytest.mark.parametrize("shape", [(1, 1), (8, 1), (3, 7), (4, 32)], ids=["one-token", "decode-8", "odd", "batch"])
def test_grouped_experts_equal_dense(shape):
    """One token (a decode step: 2 of 4 experts run), a decode step of 8 rows, a shape whose picks
    leave partial blocks, a training batch: logits and every gradient as the dense dispatch's."""
    cfg, params = _mixtral()
    assert cfg.moe_dispatch == "grouped"
    dense = cfg.replace(moe_dispatch="dense")
    tokens = jax.random.randint(jax.random.PRNGKey(sum(shape)), shape, 0, cfg.vocab_size)
    # jitted: run op by op, the grouped dispatch's scan takes several times longer than compiling it
    got, want = (jax.jit(lambda p, t, c=c: GPT(c).apply({"params": p}, t))(params, tokens) for c in (cfg, dense))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    got_grads, want_grads = (jax.jit(jax.grad(lambda p, t, c=c: _loss(c, p, t)))(params, tokens) for c in (cfg, dense))
    for path, g, w in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(got_grads),
                          jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5 * float(jnp.max(jnp.abs(w))), err_msg=str(path[0]))


def test_grouped_experts_when_every_token_picks_the_same_experts():
    """A router that cannot tell the experts apart (all logits equal): every token picks experts 0 and
    1, the others get nothing."""
    cfg, params = _mixtral()
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "gate" in jax.tree_util.keystr(path) else x, params)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 16), 0, cfg.vocab_size)
    got, want = (GPT(c).apply({"params": params}, tokens) for c in (cfg, cfg.replace(moe_dispatch="dense")))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_grouped_experts_on_a_mesh_equal_one_device():
    """Experts split over tensor, the batch over data and fsdp (2x2x2): the same logits and gradients
    as unsharded."""
    cfg, params = _mixtral()
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())
    rules = RULE_SETS["default"]
    boxed = jax.eval_shape(lambda: GPT(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    sharded = jax.device_put(params, logical_to_sharding(boxed, mesh, rules))
    tokens = jax.random.randint(jax.random.PRNGKey(2), (8, 16), 0, cfg.vocab_size)
    want_loss, want_grads = jax.jit(jax.value_and_grad(_loss, argnums=1), static_argnums=0)(cfg, params, tokens)
    with with_mesh(mesh, rules):
        got_loss, got_grads = jax.jit(jax.value_and_grad(_loss, argnums=1), static_argnums=0)(cfg, sharded, tokens)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5 * float(jnp.max(jnp.abs(w))))
