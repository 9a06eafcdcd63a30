import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

from lightjax.model.config import ModelConfig
from lightjax.model.gpt import (
    GPT,
    REMAT_POLICIES,
    abstract_params,
    causal_attention,
    count_params,
    stack_layers,
    unstack_layers,
)
from lightjax.model.layers import apply_rope, dropout, rope_cos_sin
from tests.helpers import tiny_config, tiny_preset

FAMILIES = ["pythia", "llama"]


def _tokens(cfg, batch=2, length=16, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, cfg.vocab_size)


def _init(cfg, **kwargs):
    tokens = _tokens(cfg)
    return nn.unbox(jax.jit(GPT(cfg, **kwargs).init)(jax.random.key(1), tokens))["params"], tokens


def _apply(model, params, tokens, **kwargs):
    """Jitted forward pass: eager Flax dispatches (and compiles) every op separately, which is slow."""
    return jax.jit(lambda p, t: model.apply({"params": p}, t, **kwargs))(params, tokens)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_compute_dtype_reaches_every_matmul_while_norms_and_softmax_stay_float32(dtype):
    """The forward program of a run's model (train.dtype): every matmul's operands in that dtype; the
    attention softmax and the norms' rsqrt in float32 either way."""
    import re

    from lightjax.train.run import build_model

    cfg = tiny_config("llama")
    model = build_model(cfg, {"dtype": dtype, "param_dtype": "float32", "scan_layers": False, "remat": "none"})
    params, tokens = _init(cfg)
    text = jax.jit(lambda p, t: model.apply({"params": p}, t)).lower(params, tokens).as_text()
    short = {"bfloat16": "bf16", "float32": "f32"}[dtype]
    operands = re.findall(r"stablehlo\.dot_general .*: \(tensor<[\dx]*x(\w+)>, tensor<[\dx]*x(\w+)>\)", text)
    assert len(operands) == 15 and all(pair == (short, short) for pair in operands), operands
    # The softmax over [.., q_per_kv * T, T] (a group's query heads stacked, 2 x 16 queries, 16 keys).
    scores = re.findall(r"stablehlo\.exponential .*: tensor<[\dx]*x32x16x(\w+)>", text)
    rsqrt = re.findall(r"stablehlo\.rsqrt .*: tensor<[\dx]*x(\w+)>", text)
    assert scores and set(scores) == {"f32"} and rsqrt and set(rsqrt) == {"f32"}


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_and_dtypes(family):
    cfg = tiny_config(family)
    params, tokens = _init(cfg)
    logits = _apply(GPT(cfg), params, tokens)
    assert logits.shape == (2, 16, cfg.padded_vocab_size) and logits.dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    logits_bf16 = _apply(GPT(cfg, dtype=jnp.bfloat16), params, tokens)
    assert logits_bf16.dtype == jnp.float32 and np.isfinite(np.asarray(logits_bf16)).all()
    bf16_params = abstract_params(cfg, param_dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf16_params))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_every_parameter_has_logical_axes(scan_layers):
    boxed = abstract_params(tiny_config("llama"), scan_layers=scan_layers)
    flat = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
    leaves = [box for _, box in flat]
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
    for path, box in flat:
        assert len(box.names) == box.value.ndim
        in_stack = jax.tree_util.keystr(path).startswith("['h']")
        assert (box.names[0] == "layers") == in_stack == (scan_layers and in_stack)
    names = {n for box in leaves for n in box.names if n}
    assert names == {"vocab", "embed", "heads", "kv", "mlp", "norm"} | ({"layers"} if scan_layers else set())


def test_sequence_longer_than_block_size_is_refused():
    cfg = tiny_config(block_size=8)
    with pytest.raises(ValueError, match="Sequence length 16 exceeds the model's block_size=8"):
        GPT(cfg).init(jax.random.key(0), _tokens(cfg))


@pytest.mark.parametrize("family", FAMILIES)
def test_causality(family):
    cfg = tiny_config(family)
    params, tokens = _init(cfg)
    apply = jax.jit(lambda t: GPT(cfg).apply({"params": params}, t))
    base = apply(tokens)
    for t in (0, 5, 15):
        changed = tokens.at[:, t].set((tokens[:, t] + 1) % cfg.vocab_size)
        out = apply(changed)
        np.testing.assert_array_equal(out[:, :t], base[:, :t])  # the past is untouched
        assert not np.allclose(out[:, t], base[:, t])  # and the change is seen at t


def test_dropout_only_when_not_deterministic():
    cfg = tiny_config(dropout=0.2)
    params, tokens = _init(cfg)
    model = GPT(cfg)
    a = _apply(model, params, tokens)
    np.testing.assert_array_equal(a, _apply(model, params, tokens, deterministic=True))
    np.testing.assert_array_equal(a, _apply(GPT(cfg.replace(dropout=0.0)), params, tokens))
    d1 = _apply(model, params, tokens, deterministic=False, rngs={"dropout": jax.random.key(1)})
    d2 = _apply(model, params, tokens, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(d1, a) and not np.allclose(d1, d2)


@pytest.mark.parametrize("width", [384, 7])  # two elements per random word; an odd last axis draws one each
def test_dropout_drops_at_its_rate_and_keeps_the_mean(width):
    x = jnp.ones((64, 32, width))
    y = np.asarray(dropout(x, 0.2, jax.random.key(0)))
    dropped = y == 0
    assert abs(dropped.mean() - 0.2) < 4 * np.sqrt(0.2 * 0.8 / dropped.size)  # 4 standard errors
    np.testing.assert_allclose(y[~dropped], 1 / (1 - 13107 / 65536), rtol=1e-6)  # the rate to 1/65536
    assert abs(y.mean() - 1) < 0.02
    if width % 2 == 0:  # the two halves of a word are independent draws
        pairs = dropped.reshape(-1, 2)
        assert abs(np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1]) < 0.02
    np.testing.assert_array_equal(y, np.asarray(dropout(x, 0.2, jax.random.key(0))))  # the key decides
    assert not np.array_equal(y, np.asarray(dropout(x, 0.2, jax.random.key(1))))


def _loss(model, params, tokens):
    logits = model.apply({"params": params}, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_float64(family):
    with jax.enable_x64(True):
        cfg = tiny_config(family, n_embd=16, n_head=2, n_query_groups=1 if family == "llama" else None,
                          intermediate_size=32)
        model = GPT(cfg, dtype=jnp.float64, param_dtype=jnp.float64)
        tokens = _tokens(cfg, batch=2, length=6)
        params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens))["params"]
        assert jax.tree.leaves(params)[0].dtype == jnp.float64
        # Nudge biases and norm weights off their init (0 and 1) so their gradients are exercised too.
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(3), len(leaves))
        noise = [0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
        params = treedef.unflatten([x + n for x, n in zip(leaves, noise, strict=True)])
        jax.test_util.check_grads(jax.jit(lambda p: _loss(model, p, tokens)), (params,), order=1, modes=("rev",),
                                  atol=1e-5, rtol=1e-5)


def _logits_and_grads(model, params, tokens):
    """Forward and backward in one compiled function (each compile costs seconds on 2 cores)."""
    fn = jax.jit(lambda p: (model.apply({"params": p}, tokens), jax.grad(lambda p: _loss(model, p, tokens))(p)))
    return fn(params)


@functools.lru_cache
def _plain_reference(family):
    cfg = tiny_config(family)
    params, tokens = _init(cfg)
    return cfg, params, tokens, _logits_and_grads(GPT(cfg), params, tokens)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scan_layers,remat", [(True, "none"), (False, "full"), (True, "dots_saveable"),
                                               (False, "dots_with_no_batch_dims_saveable")])
def test_scan_and_remat_match_plain_model(family, scan_layers, remat):
    cfg, params, tokens, (want_logits, want_grads) = _plain_reference(family)
    other_params = stack_layers(params, cfg.n_layer) if scan_layers else params
    logits, grads = _logits_and_grads(GPT(cfg, scan_layers=scan_layers, remat=remat), other_params, tokens)
    np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=1e-5)
    if scan_layers:
        grads = unstack_layers(grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), grads, want_grads)


@pytest.mark.parametrize("window", [None, 50])
@pytest.mark.parametrize("length", [200, 256])  # 256: in query blocks (attention.QUERY_BLOCKS)
def test_cpu_attention_path_matches_jax_nn(window, length):
    """The explicit heads-major path that CPUs take, against the fused call: grouped queries and a
    sliding window included; gradients too."""
    q, k, v = (jax.random.normal(jax.random.key(i), (2, length, n, 16)) for i, n in enumerate((4, 2, 2)))
    local = None if window is None else (window - 1, 0)

    def loss(attention):
        return lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v)))

    explicit = loss(lambda q, k, v: causal_attention(q, k, v, 0.25, window=window))
    fused = loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=0.25,
                                                              local_window_size=local))
    np.testing.assert_allclose(explicit(q, k, v), fused(q, k, v), rtol=1e-5)
    for got, want in zip(jax.grad(explicit, (0, 1, 2))(q, k, v), jax.grad(fused, (0, 1, 2))(q, k, v), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_float64_attention_path_matches_jax_nn():
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 7, n, 8)) for i, n in enumerate((6, 2, 2)))
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    with jax.enable_x64(True):
        got = causal_attention(*(x.astype(jnp.float64) for x in (q, k, v)), scale=0.3)
        assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)


def test_unknown_remat_policy():
    cfg = tiny_config()
    with pytest.raises(ValueError, match=r"GPT\.remat='some' is not one of 'none', 'full'"):
        GPT(cfg, remat="some").init(jax.random.key(0), _tokens(cfg))
    assert "full" in REMAT_POLICIES


def test_stack_unstack_round_trip():
    cfg = tiny_config("llama")
    params, _ = _init(cfg)
    stacked = stack_layers(params, cfg.n_layer)
    scan_shapes = jax.tree.map(lambda x: x.shape, nn.unbox(abstract_params(cfg, scan_layers=True)))
    assert jax.tree.map(lambda x: x.shape, stacked) == scan_shapes
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(stacked), params)


def test_litgpt_pretraining_init():
    cfg = ModelConfig.from_name("baseline-tiny")
    params, _ = _init(cfg)
    std, proj_std = np.sqrt(2 / (5 * cfg.n_embd)), 1 / np.sqrt(cfg.n_embd) / cfg.n_layer
    block = params["h_0"]
    for x, want in [(params["wte"]["embedding"], std), (block["attn"]["qkv"]["kernel"], std),
                    (block["mlp"]["fc"]["kernel"], std), (params["lm_head"]["kernel"], std),
                    (block["attn"]["proj"]["kernel"], proj_std), (block["mlp"]["proj"]["kernel"], proj_std)]:
        assert abs(float(np.std(x)) / want - 1) < 0.03 and abs(float(np.mean(x))) < 0.05 * want
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = jax.tree_util.keystr(path)
        if name.endswith("['bias']"):
            assert not np.any(x), name
        if name.endswith("['scale']"):
            assert np.all(x == 1), name
    assert count_params(params) == 10_745_856


def test_interleaved_rope_is_half_rope_on_paired_channels():
    """Rotating pairs (0, 1), (2, 3), ... equals rotating halves after moving channel 2i to i and 2i+1
    to n/2 + i: the two conventions differ only in where each pair's channels sit."""
    cfg = tiny_config("llama", rope_interleave=True)
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    x = jax.random.normal(jax.random.key(0), (2, 6, 4, cfg.head_size))
    perm = np.concatenate([np.arange(0, cfg.head_size, 2), np.arange(1, cfg.head_size, 2)])
    cos_i, sin_i = rope_cos_sin(cfg, positions)
    cos_h, sin_h = rope_cos_sin(cfg.replace(rope_interleave=False), positions)
    interleaved = apply_rope(x, cos_i, sin_i, interleave=True)
    halves = apply_rope(x[..., perm], cos_h, sin_h)
    np.testing.assert_allclose(interleaved[..., perm], halves, atol=1e-6)
    assert not np.allclose(interleaved, apply_rope(x, cos_h, sin_h), atol=1e-3)  # and it is not the same rope


@pytest.mark.parametrize("preset", ["gemma-2-2b", "gemma-3-1b-it", "Mixtral-8x7B-v0.1", "OLMo-2-1124-7B"])
def test_scan_layout_equals_loop_layout_for_every_block_kind(preset):
    """Layers that differ (windows, local RoPE) reach the scanned stack as data; the logits are the loop's."""
    cfg = tiny_preset(preset)
    tokens = _tokens(cfg)
    params = nn.unbox(GPT(cfg).init(jax.random.key(0), tokens)["params"])
    loop = GPT(cfg).apply({"params": params}, tokens)
    scan = GPT(cfg, scan_layers=True).apply({"params": stack_layers(params, cfg.n_layer)}, tokens)
    np.testing.assert_allclose(scan, loop, atol=1e-5, rtol=1e-5)


def test_sliding_window_limits_what_a_query_sees():
    """With a 4-key window, changing token 0 changes the logits at positions 0-3 only."""
    cfg = tiny_preset("Mistral-7B-v0.1")
    tokens = _tokens(cfg)
    params = GPT(cfg).init(jax.random.key(0), tokens)["params"]
    changed = tokens.at[:, 0].set((tokens[:, 0] + 1) % cfg.vocab_size)
    diff = np.abs(GPT(cfg).apply({"params": params}, tokens) - GPT(cfg).apply({"params": params}, changed))
    per_position = diff.max(axis=(0, 2))
    # Two layers: position t sees t-3..t directly, and through layer 1 what those saw: t-6.. t.
    assert (per_position[:7] > 0).all() and (per_position[7:] == 0).all()


def test_experts_are_split_over_the_tensor_axis():
    from lightjax.runtime.sharding import RULE_SETS, logical_to_sharding, make_mesh

    cfg = tiny_preset("Mixtral-8x7B-v0.1")
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    shardings = logical_to_sharding(abstract_params(cfg), mesh, RULE_SETS["default"])
    mlp = shardings["h_0"]["mlp"]
    assert tuple(mlp["fc_1"].spec) == ("tensor", "fsdp", None) and tuple(mlp["proj"].spec) == ("tensor", None, "fsdp")


def test_norm_gradients_equal_autodiffs():
    """LayerNorm and RMSNorm's written-out gradients against autodiff of the plain formulas."""
    from lightjax.model.layers import _layer_norm, _rms_norm

    rng = np.random.default_rng(0)
    x, w = (jnp.asarray(rng.standard_normal((3, 5, 64)) * 3 + 1, jnp.float32) for _ in range(2))
    scale, bias = (jnp.asarray(rng.standard_normal(64), jnp.float32) for _ in range(2))

    def layer_norm(x, s, b):
        m = x.mean(-1, keepdims=True)
        return (x - m) * jax.lax.rsqrt(jnp.square(x - m).mean(-1, keepdims=True) + 1e-5) * s + b

    def rms_norm(x, s):
        return x * jax.lax.rsqrt(jnp.square(x).mean(-1, keepdims=True) + 1e-6) * s

    for ours, plain, args in ((lambda *a: _layer_norm(*a, 1e-5), layer_norm, (x, scale, bias)),
                              (lambda *a: _rms_norm(*a, 1e-6), rms_norm, (x, scale))):
        argnums = tuple(range(len(args)))
        got = jax.grad(lambda *a, f=ours: jnp.sum(f(*a) * w), argnums)(*args)
        want = jax.grad(lambda *a, f=plain: jnp.sum(f(*a) * w), argnums)(*args)
        np.testing.assert_array_equal(ours(*args), plain(*args))
        for g, h in zip(got, want, strict=True):
            np.testing.assert_allclose(g, h, rtol=0, atol=1e-6 * float(jnp.abs(h).max()))
