"""LoRA: adapters start as the base model, only they train, they merge back exactly, on any mesh."""

import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from lightjax.model import lora
from lightjax.model.gpt import GPT, stack_layers
from lightjax.runtime.sharding import shard_batch
from lightjax.train.config import ConfigError
from lightjax.train.run import build_run
from lightjax.train.step import synthetic_batch
from lightjax.train.validate import validate
from tests.helpers import tiny_config, tiny_run_config

ALL_TARGETS = ("query", "key", "value", "proj", "mlp", "head")


def lora_config(family="pythia", targets=("query", "value"), rank=4, **fields):
    return tiny_config(family, lora_r=rank, lora_alpha=8.0, lora_targets=targets, **fields)


def tokens(cfg, batch=2, length=12, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length)).astype(np.int32)


def randomize_adapters(params, seed=1):
    """Non-zero B (and A) everywhere, as after some training."""
    adapters, rest = lora.split(params)
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    leaves = [0.1 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    return lora.combine(jax.tree.unflatten(tree, leaves), rest)


@pytest.mark.parametrize("family", ["pythia", "llama"])
@pytest.mark.parametrize("targets", [("query", "value"), ALL_TARGETS])
def test_a_fresh_lora_model_computes_the_base_model_exactly(family, targets):
    base_cfg = tiny_config(family)
    base = nn.unbox(GPT(base_cfg).init(jax.random.PRNGKey(0), tokens(base_cfg))["params"])
    cfg = lora_config(family, targets)
    params = nn.unbox(GPT(cfg).init(jax.random.PRNGKey(1), tokens(cfg))["params"])
    adapters, rest = lora.split(params)
    assert jax.tree.structure(rest) == jax.tree.structure(base)
    assert {path[-1].key for path, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]} == {"lora_a", "lora_b"}
    params = lora.combine(adapters, base)
    x = tokens(cfg)
    np.testing.assert_array_equal(GPT(cfg).apply({"params": params}, x), GPT(base_cfg).apply({"params": base}, x))


def adapted_layers(params):
    return sorted("/".join(k.key for k in path[:-1]) for path, _ in
                  jax.tree_util.tree_flatten_with_path(lora.split(params)[0])[0] if path[-1].key == "lora_a")


def test_targets_pick_the_adapted_layers():
    def layers(family, targets):
        cfg = lora_config(family, targets)
        return adapted_layers(nn.unbox(jax.eval_shape(GPT(cfg).init, jax.random.PRNGKey(0), tokens(cfg))["params"]))

    assert layers("pythia", ("query",)) == ["h_0/attn/qkv", "h_1/attn/qkv"]
    assert layers("pythia", ("proj", "head")) == ["h_0/attn/proj", "h_1/attn/proj", "lm_head"]
    assert layers("llama", ("mlp",)) == [f"h_{i}/mlp/{n}" for i in range(2) for n in ("fc_1", "fc_2", "proj")]


@pytest.mark.parametrize("family", ["pythia", "llama"])
@pytest.mark.parametrize("targets", [("query", "value"), ("key",), ALL_TARGETS])
def test_merged_weights_compute_the_lora_model(family, targets):
    cfg = lora_config(family, targets)
    params = randomize_adapters(nn.unbox(GPT(cfg).init(jax.random.PRNGKey(0), tokens(cfg))["params"]))
    merged_cfg, merged = lora.merge(cfg, params)
    assert merged_cfg.lora_r == 0 and not lora.split(merged)[0]
    x = tokens(cfg)
    want = GPT(cfg).apply({"params": params}, x)
    np.testing.assert_allclose(GPT(merged_cfg).apply({"params": merged}, x), want, atol=1e-5, rtol=0)
    # The scan layout merges the same way (adapters with a leading layers axis).
    _, merged_scan = lora.merge(cfg, stack_layers(params, cfg.n_layer))
    got = GPT(merged_cfg, scan_layers=True).apply({"params": merged_scan}, x)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_only_query_and_value_slots_of_qkv_adapt():
    """The key slot's B is masked: its kernel does not change in the merge, the query and value slots do."""
    cfg = lora_config("llama", ("query", "value"))
    params = randomize_adapters(nn.unbox(GPT(cfg).init(jax.random.PRNGKey(0), tokens(cfg))["params"]))
    _, merged = lora.merge(cfg, params)
    before, after = params["h_0"]["attn"]["qkv"]["kernel"], merged["h_0"]["attn"]["qkv"]["kernel"]
    q = cfg.q_per_kv
    np.testing.assert_array_equal(after[:, :, q], before[:, :, q])  # the key slot
    assert not np.allclose(after[:, :, :q], before[:, :, :q])
    assert not np.allclose(after[:, :, q + 1], before[:, :, q + 1])


def lora_run_config(family="llama", mesh=(1, 1, 1), targets=("query", "value"), **train):
    c = tiny_run_config(family, mesh, **train)
    c.lora.rank, c.lora.alpha, c.lora.dropout, c.lora.targets = 4, 8.0, 0.0, targets
    c.optim.lr = 1e-2
    return c


def train_lora(config, n_steps=3):
    devices = jax.devices()[: math.prod([config.mesh.data, config.mesh.fsdp, config.mesh.tensor])]
    run = build_run(config, devices)
    state = run.init_state()
    start = jax.device_get(state.params)
    rng, losses = np.random.default_rng(0), []
    for _ in range(n_steps):
        batch = synthetic_batch(rng, config.train.global_batch_size, config.data.seq_len, run.model.config.vocab_size)
        state, metrics = run.train_step(state, shard_batch(batch, run.mesh))
        losses.append(float(metrics["loss"]))
    return run, start, state, np.array(losses)


def test_training_changes_only_the_adapters_and_keeps_optimizer_state_for_them_only():
    run, start, state, _ = train_lora(lora_run_config(targets=ALL_TARGETS))
    end = jax.device_get(state.params)
    jax.tree.map(np.testing.assert_array_equal, lora.split(end)[1], lora.split(start)[1])  # base: bit-equal
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), lora.split(end)[0], lora.split(start)[0])
    assert all(jax.tree.leaves(changed))
    adapter_size = sum(x.size for x in jax.tree.leaves(lora.split(end)[0]))
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]  # besides the scalar step counts
    assert sum(x.size for x in moments) == 2 * adapter_size  # AdamW's two moments per adapter scalar
    full_size = sum(x.size for x in jax.tree.leaves(end))
    assert adapter_size < full_size / 4


def test_frozen_weights_may_be_held_in_bfloat16_beside_float32_adapters():
    run, start, state, losses = train_lora(lora_run_config(param_dtype="bfloat16"))
    adapters, base = lora.split(jax.device_get(state.params))
    assert {x.dtype for x in jax.tree.leaves(base)} == {np.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves(adapters)} == {np.dtype("float32")}
    assert np.isfinite(losses).all()
    jax.tree.map(np.testing.assert_array_equal, base, lora.split(start)[1])


@pytest.mark.parametrize("mesh", [(1, 8, 1), (1, 2, 4), (2, 2, 2)])
@pytest.mark.parametrize("scan", [False, True])
def test_lora_trains_on_any_mesh_like_one_device(mesh, scan):
    _, _, want_state, want = train_lora(lora_run_config(scan_layers=scan, remat="full" if scan else "none"))
    _, _, state, losses = train_lora(lora_run_config(mesh=mesh, scan_layers=scan, remat="full" if scan else "none"))
    np.testing.assert_allclose(losses, want, atol=1e-5, rtol=0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0),
                 jax.device_get(lora.split(state.params)[0]), jax.device_get(lora.split(want_state.params)[0]))


@pytest.mark.parametrize("key, value, why", [
    ("targets", ("query", "keys"), "must name one or more of"),
    ("targets", ("head",), "tied to the embeddings"),
    ("rank", -1, "must be >= 0"),
    ("alpha", 0.0, "must be positive"),
])
def test_bad_lora_settings_are_one_line_errors(key, value, why):
    c = lora_run_config()
    c.model.tie_embeddings = True
    setattr(c.lora, key, value)
    with pytest.raises(ConfigError, match=f"config.lora.{key}=.*{why}"):
        validate(c, 1)
