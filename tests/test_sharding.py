"""Sharding on 8 simulated CPU devices: the same training on every mesh, and the layouts the rules promise."""

import functools
import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from lightjax.model.config import ModelConfig
from lightjax.model.gpt import abstract_params
from lightjax.runtime.sharding import PlacedBatches, make_mesh, mesh_shape, resolve_rules, shard_batch
from lightjax.train.config import ConfigError, default_config, resolve_model_config
from lightjax.train.run import build_run
from lightjax.train.step import synthetic_batch
from lightjax.train.validate import validate
from tests.helpers import preset_run_config, tiny_run_config

MESHES = [(8, 1, 1), (1, 8, 1), (1, 2, 4), (2, 2, 2)]


def run_steps(config, n_steps=3, seed=0):
    devices = jax.devices()[: int(np.prod([config.mesh.data, config.mesh.fsdp, config.mesh.tensor]))]
    training = build_run(config, devices)
    state = training.init_state()
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(n_steps):
        batch = synthetic_batch(rng, config.train.global_batch_size, config.data.seq_len,
                                training.model.config.vocab_size)
        state, metrics = training.train_step(state, shard_batch(batch, training.mesh))
        losses.append(float(metrics["loss"]))
    return np.array(losses), jax.device_get(state.params), state


def assert_params_close(params, want_params):
    """Equal to 1e-5 relative to each tensor's scale."""

    def close(path, a, b):
        if jax.tree_util.keystr(path).endswith("['qkv']['bias']"):
            # Slots per query group: queries.., key, value. The key bias adds the same q.b to every score
            # of a query, which softmax ignores: its true gradient is 0 outside the rotary dims, it
            # receives mostly float32 roundoff, and AdamW scales that noise up to lr-sized steps that
            # differ per mesh. The query bias's gradient is ~10x smaller than the value bias's, so AdamW
            # scales its roundoff ~10x: compared at 1e-4.
            np.testing.assert_allclose(a[:, :-2], b[:, :-2], rtol=1e-4, atol=1e-4 * np.abs(b).max())
            a, b = a[:, -1], b[:, -1]
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())

    jax.tree_util.tree_map_with_path(close, params, want_params)


@functools.lru_cache
def single_device_run(family):
    return run_steps(tiny_run_config(family))


@pytest.mark.parametrize("family", ["pythia", "llama"])
@pytest.mark.parametrize("mesh", MESHES)
def test_every_mesh_trains_like_one_device(family, mesh):
    want_losses, want_params, _ = single_device_run(family)
    losses, params, _ = run_steps(tiny_run_config(family, mesh))
    np.testing.assert_allclose(losses, want_losses, atol=1e-5, rtol=0)

    assert_params_close(params, want_params)


def test_dropout_masks_are_the_same_on_every_mesh():
    """The masks depend on the key and the element, not on where the element is: a 2x2x2 mesh trains
    with dropout like one device."""
    def with_dropout(mesh):
        c = tiny_run_config("pythia", mesh)
        c.model.dropout = 0.2
        return c

    want, want_params, _ = run_steps(with_dropout((1, 1, 1)))
    losses, params, _ = run_steps(with_dropout((2, 2, 2)))
    assert not np.allclose(want, single_device_run("pythia")[0])  # dropout really on
    np.testing.assert_allclose(losses, want, atol=1e-5, rtol=0)
    assert_params_close(params, want_params)


# One preset per family beyond the two above, shrunk (tests/helpers.py:tiny_preset).
FAMILY_PRESETS = ["Mistral-7B-v0.1", "Mixtral-8x7B-v0.1", "phi-2", "Phi-3-mini-4k-instruct", "gemma-2b",
                  "gemma-2-2b", "gemma-3-1b-it", "Qwen2.5-0.5B", "Qwen3-0.6B", "OLMo-2-1124-7B", "falcon-7b"]


@pytest.mark.parametrize("preset", FAMILY_PRESETS)
def test_every_family_trains_on_a_2x2x2_mesh_like_one_device(preset):
    # One layer where all layers are alike (each compile costs seconds on 2 cores); Gemma 2/3 keep
    # a local and a global one.
    layers = {} if ModelConfig.from_name(preset).sliding_window_indices else {"n_layer": 1}
    want, _, _ = run_steps(preset_run_config(preset, **layers))
    losses, _, _ = run_steps(preset_run_config(preset, mesh=(2, 2, 2), **layers))
    assert np.isfinite(want).all()
    np.testing.assert_allclose(losses, want, atol=1e-5, rtol=0)


def test_fsdp_splits_every_embed_axis_eight_ways():
    _, _, state = run_steps(tiny_run_config(mesh=(1, 8, 1)), n_steps=1)
    boxed = abstract_params(resolve_model_config(tiny_run_config()))
    names = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    arrays = jax.tree.leaves(state.params)
    checked = 0
    for box, array in zip(names, arrays, strict=True):
        if "embed" in box.names and array.shape[box.names.index("embed")] >= 8:
            axis = box.names.index("embed")
            assert array.sharding.spec[axis] == "fsdp", (box.names, array.sharding.spec)
            assert array.addressable_shards[0].data.shape[axis] == array.shape[axis] // 8
            checked += 1
    assert checked >= 9  # embedding, lm_head, and qkv/proj/fc/proj of both layers
    # The optimizer moments follow their parameters.
    mu = state.opt_state[1][0].mu
    assert mu["h_0"]["mlp"]["fc"]["kernel"].sharding.spec == state.params["h_0"]["mlp"]["fc"]["kernel"].sharding.spec


def test_tensor_parallel_splits_outputs_then_inputs():
    _, _, state = run_steps(tiny_run_config("llama", mesh=(2, 1, 4)), n_steps=1)
    layer = state.params["h_1"]

    def ways(array):  # how many pieces each axis is cut into on the devices
        return tuple(full // part for full, part in zip(array.shape, array.addressable_shards[0].data.shape,
                                                         strict=True))

    assert ways(layer["attn"]["qkv"]["kernel"]) == (1, 4, 1, 1)  # [embed, query groups, q..k v, head_size]
    assert ways(layer["mlp"]["fc_1"]["kernel"]) == ways(layer["mlp"]["fc_2"]["kernel"]) == (1, 4)  # [embed, mlp]
    assert ways(layer["attn"]["proj"]["kernel"]) == (4, 1, 1)  # [heads, head_size, embed]
    assert ways(layer["mlp"]["proj"]["kernel"]) == (4, 1)  # [mlp, embed]
    assert ways(state.params["lm_head"]["kernel"]) == (1, 4)  # [embed, vocab]
    assert ways(layer["norm_1"]["scale"]) == (1,)


def _state_bytes_per_device(config):
    """Bytes of one device's share of the train state, from the shardings (nothing compiled)."""
    state = build_run(config).abstract_state
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))


def test_fsdp_cuts_per_device_state_memory():
    base = default_config()  # baseline-tiny: 10.7M parameters, 123 MiB of state
    base.data.seq_len, base.train.global_batch_size, base.train.scan_layers = 64, 8, True
    base.mesh.data, base.mesh.fsdp = 8, 1
    data_bytes = _state_bytes_per_device(base)
    base.mesh.data, base.mesh.fsdp = 1, 8
    fsdp_bytes = _state_bytes_per_device(base)
    assert data_bytes > 120 * 2**20 and fsdp_bytes <= data_bytes / 7, (fsdp_bytes, data_bytes)


def test_gradient_accumulation_matches_one_big_batch():
    one_losses, one_params, _ = run_steps(tiny_run_config(grad_accum_steps=1), n_steps=2)
    acc_losses, acc_params, _ = run_steps(tiny_run_config(grad_accum_steps=4), n_steps=2)
    np.testing.assert_allclose(acc_losses, one_losses, atol=1e-5)
    assert_params_close(acc_params, one_params)


def test_gradient_accumulation_on_a_sharded_batch():
    losses, _, _ = run_steps(tiny_run_config(mesh=(2, 2, 2), grad_accum_steps=2, global_batch_size=8), n_steps=2)
    want, _, _ = run_steps(tiny_run_config(), n_steps=2)
    np.testing.assert_allclose(losses, want, atol=1e-5)


def test_bfloat16_compute_tracks_float32():
    def ten_steps(dtype):
        c = tiny_run_config(dtype=dtype)
        c.optim.lr = 3e-3
        training = build_run(c, jax.devices()[:1])
        state = training.init_state()
        # A learnable stream (a repeating pattern), so the loss moves over the 10 steps.
        tokens = np.tile(np.arange(17, dtype=np.int32) % 11, (8, 1))
        batch = shard_batch({"tokens": tokens}, training.mesh)
        for _ in range(10):
            state, metrics = training.train_step(state, batch)
        return float(metrics["loss"])

    f32, bf16 = ten_steps("float32"), ten_steps("bfloat16")
    assert 0 < abs(bf16 - f32) / f32 < 0.02, (f32, bf16)  # bf16 really used, and close


def test_mesh_minus_one_takes_remaining_devices():
    assert mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh({"data": 1, "fsdp": -1, "tensor": 1}).shape) == {"data": 1, "fsdp": 8, "tensor": 1}


def test_mesh_product_must_equal_device_count():
    with pytest.raises(ValueError, match=r"config.mesh \(data=2, fsdp=2, tensor=1\) has 4 positions but "
                                         r"jax.device_count\(\) is 8"):
        make_mesh({"data": 2, "fsdp": 2, "tensor": 1})
    with pytest.raises(ValueError, match="not divisible by the fixed axes' product 3"):
        mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)


def test_global_batch_must_divide_over_batch_shards_and_accumulation():
    c = tiny_run_config(mesh=(2, 2, 2), grad_accum_steps=3, global_batch_size=8)
    with pytest.raises(ConfigError, match=r"config.train.global_batch_size=8 must be divisible by "
                                          r"mesh.data\*mesh.fsdp\*train.grad_accum_steps = 2\*2\*3 = 12"):
        validate(c, 8)


def test_tensor_must_divide_heads_and_query_groups():
    with pytest.raises(ConfigError, match=r"config.mesh.tensor=8 must divide the model's n_query_groups=4"):
        validate(tiny_run_config("llama", mesh=(1, 1, 8)), 8)
    c = tiny_run_config(mesh=(2, 1, 4))
    c.model.n_head, c.model.n_embd = 6, 48
    with pytest.raises(ConfigError, match=r"config.mesh.tensor=4 must divide the model's n_head=6"):
        validate(c, 8)


def test_seq_len_longer_than_block_size():
    c = tiny_run_config()
    c.data.seq_len = 64
    with pytest.raises(ConfigError, match=r"config.data.seq_len=64 must be in \[1, model block_size=32\]"):
        validate(c, 1)


def test_rules_by_name_or_explicit():
    assert resolve_rules("default")[0] == ("batch", ("data", "fsdp"))
    custom = resolve_rules([("batch", "data"), ("embed", ["fsdp", "tensor"]), ("mlp", None)])
    assert custom == (("batch", "data"), ("embed", ("fsdp", "tensor")), ("mlp", None))
    assert resolve_rules("[('batch', 'data'), ('embed', ('fsdp', 'tensor')), ('mlp', None)]") == custom
    with pytest.raises(ValueError, match=r"config.mesh.rules='zero3' is not one of 'default', 'replicated'"):
        resolve_rules("zero3")
    with pytest.raises(ValueError, match=r"names a mesh axis not in \('data', 'fsdp', 'tensor'\)"):
        resolve_rules([("embed", "model")])


def test_placed_batches_come_in_order_and_pass_errors_on():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 1}, jax.devices()[:4])
    source = [{"tokens": np.full((4, 3), i, np.int32)} for i in range(5)]
    placed = PlacedBatches(iter(source), mesh, ahead=2)
    got = list(placed)  # ends where the source does
    assert [int(b["tokens"][0, 0]) for b in got] == list(range(5))
    assert all(b["tokens"].sharding == shard_batch(source[0], mesh)["tokens"].sharding for b in got)
    placed.close()

    def failing():
        yield source[0]
        raise OSError("disk gone")

    placed = PlacedBatches(failing(), mesh)
    assert int(next(placed)["tokens"][0, 0]) == 0
    with pytest.raises(OSError, match="disk gone"):
        next(placed)
    placed.close()

    endless = PlacedBatches(iter(lambda: source[1], None), mesh, ahead=1)  # its thread waits on a full queue
    next(endless)
    endless.close()
    assert not endless._thread.is_alive()


def test_a_multi_slice_mesh_may_split_a_slice_s_physical_axes():
    """fsdp=8 inside each 4x4 v5e slice of 2 x v5e-16 (data=4: two rows per slice) spans parts of two rings."""
    from lightjax.runtime.hardware import tpu_topology
    from tests.test_hardware import _require_libtpu

    _require_libtpu()
    mesh = make_mesh({"data": 4, "fsdp": 8, "tensor": 1}, tpu_topology("2xv5e-16").devices())
    slices = [{d.slice_index for d in row.flat} for row in mesh.devices]
    assert dict(mesh.shape) == {"data": 4, "fsdp": 8, "tensor": 1} and slices == [{0}, {0}, {1}, {1}]
