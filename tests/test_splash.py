"""Splash attention, the TPU kernel: in interpret mode on this CPU it equals the einsum reference's outputs and
gradients for causal, windowed, soft-capped and grouped-query attention with segment ids; `auto` picks it on a
TPU; the train step compiled for TPU slices holds the Mosaic kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightjax.model.attention import causal_attention, resolve_attention
from lightjax.model.splash import splash_attention
from tests.helpers import tiny_config
from tests.test_hardware import _require_libtpu

SEGMENTS = np.repeat([[1] * 100 + [2] * 60 + [3] * 96], 2, axis=0)  # three documents in each 256-token row


@pytest.mark.parametrize("window,softcap,groups,segments", [
    (None, None, 4, False),  # causal, one key/value head per query head
    (None, None, 2, True),  # grouped queries, document segments
    (40, None, 2, True),  # a sliding window of 40 keys
    (None, 20.0, 1, True),  # Gemma 2's logit soft-cap, multi-query
])
def test_splash_equals_the_reference_outputs_and_gradients(window, softcap, groups, segments):
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 256, n, 64)) for i, n in enumerate((4, groups, groups)))
    segment_ids = jnp.asarray(SEGMENTS) if segments else None

    def loss(attention):
        return lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v)))

    reference = loss(lambda q, k, v: causal_attention(q, k, v, 0.125, window, softcap, "einsum", segment_ids))
    splash = loss(lambda q, k, v: splash_attention(q, k, v, 0.125, window, softcap, segment_ids, interpret=True))
    (got, got_grads), (want, want_grads) = (jax.jit(jax.value_and_grad(f, (0, 1, 2)))(q, k, v)
                                            for f in (splash, reference))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_auto_takes_splash_on_a_tpu_where_the_length_suits_its_blocks():
    cfg, capped = tiny_config(), tiny_config(attention_logit_softcapping=50.0)
    assert resolve_attention("auto", cfg, "bfloat16", "tpu", seq_len=8192) == ("splash",
                                                                                "auto on tpu; blocks of 512 tokens")
    assert resolve_attention("auto", capped, "bfloat16", "tpu", segments=True, seq_len=256)[0] == "splash"
    assert resolve_attention("auto", cfg, "bfloat16", "tpu", seq_len=100)[0] == "xla"  # not a multiple of 128
    with pytest.raises(ValueError, match=r"'splash' cannot run here: the backend is cpu, not a TPU"):
        resolve_attention("splash", cfg, "float32", "cpu", seq_len=256)
    with pytest.raises(ValueError, match=r"'splash' cannot run here: the sequence length 100 is not a multiple"):
        resolve_attention("splash", cfg, "float32", "tpu", seq_len=100)


@pytest.mark.parametrize("topology,mesh", [("v5e:2x2", (1, 2, 2)), ("v5p:2x2x2", (2, 2, 2))])
def test_the_train_step_compiled_for_a_tpu_slice_runs_the_kernel(topology, mesh):
    """Document-masked rows of 256 tokens on a tiny model: the compiled step holds Mosaic custom calls
    (the kernel, forward and backward), none with attention=xla."""
    from lightjax.runtime.hardware import tpu_topology
    from lightjax.runtime.sharding import batch_sharding
    from lightjax.train.run import build_run
    from tests.helpers import tiny_run_config

    _require_libtpu()
    counts = {}
    for kernel in ("auto", "xla"):
        config = tiny_run_config(mesh=mesh, attention=kernel, dtype="bfloat16")
        config.data.seq_len = config.model.block_size = 256
        run = build_run(config, tpu_topology(topology).devices())
        sharding = batch_sharding(run.mesh)
        rows = {"tokens": jax.ShapeDtypeStruct((8, 257), np.int32, sharding=sharding),
                **{k: jax.ShapeDtypeStruct((8, 256), np.int32, sharding=sharding)
                   for k in ("mask", "segment_ids", "positions")}}
        text = run.train_step.lower(run.abstract_state, rows).compile().as_text()
        counts[run.model.attention] = text.count("tpu_custom_call")
    assert counts["splash"] > 0 and counts["xla"] == 0, counts
