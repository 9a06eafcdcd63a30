"""The attention kernel is a setting (config.train.attention): resolved when the run is built and said at
start; an explicit kernel that cannot run here is one line, never a silent fallback."""

import jax
import numpy as np
import pytest

from lightjax.model.attention import resolve_attention
from lightjax.model.gpt import GPT
from lightjax.train.config import ConfigError
from lightjax.train.run import build_run
from lightjax.train.step import synthetic_batch
from tests.helpers import tiny_config, tiny_run_config
from tests.runs import run_config


def test_auto_picks_per_backend_and_dtype():
    cfg, capped = tiny_config(), tiny_config(attention_logit_softcapping=50.0)
    assert resolve_attention("auto", cfg, "float32", "cpu") == ("einsum", "auto: CPU")
    assert resolve_attention("auto", cfg, "bfloat16", "tpu") == ("splash", "auto on tpu")
    assert resolve_attention("auto", cfg, "bfloat16", "tpu", seq_len=100) == ("xla", "auto on tpu")  # not by 128
    assert resolve_attention("auto", capped, "bfloat16", "tpu")[0] == "splash"  # it soft-caps
    assert resolve_attention("auto", capped, "bfloat16", "gpu") == ("einsum", "auto: score soft-capping")
    assert resolve_attention("auto", cfg, "float32", "gpu")[0] == "xla"  # cuDNN takes bfloat16 or float16
    assert resolve_attention("xla", cfg, "float32", "cpu") == ("xla", "as configured")


@pytest.mark.parametrize("kernel,backend,capped,message", [
    ("cudnn", "cpu", False, "attention kernel 'cudnn' cannot run here: the backend is cpu, not an NVIDIA GPU"),
    ("cudnn", "gpu", False, "attention kernel 'cudnn' cannot run here: it takes bfloat16 or float16, not float32"),
    ("xla", "tpu", True, "attention kernel 'xla' cannot soft-cap the scores (attention_logit_softcapping=50.0)"),
])
def test_a_kernel_that_cannot_run_is_refused(kernel, backend, capped, message):
    cfg = tiny_config(attention_logit_softcapping=50.0 if capped else None)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_attention(kernel, cfg, "float32", backend)


def test_an_explicit_kernel_is_a_config_error_when_the_run_is_built():
    config = tiny_run_config(attention="cudnn")
    with pytest.raises(ConfigError, match=r"^config.train.attention: attention kernel 'cudnn' cannot run here"):
        build_run(config, jax.devices()[:1])


def test_the_xla_kernel_trains_like_the_einsum_one():
    losses = {}
    for kernel in ("einsum", "xla"):
        run = build_run(tiny_run_config(attention=kernel), jax.devices()[:1])
        assert run.model.attention == kernel and run.attention_why == "as configured"
        batch = synthetic_batch(np.random.default_rng(0), 8, 16, 96)
        _, metrics = run.train_step(run.init_state(), batch)
        losses[kernel] = float(metrics["loss"])
    assert losses["xla"] == pytest.approx(losses["einsum"], rel=1e-5)


def test_a_gpt_built_by_hand_resolves_auto_when_traced():
    cfg = tiny_config()
    tokens = np.zeros((2, 8), np.int32)
    variables = GPT(cfg).init(jax.random.key(0), tokens)
    np.testing.assert_allclose(GPT(cfg).apply(variables, tokens), GPT(cfg, attention="einsum").apply(variables, tokens))


def test_training_says_which_kernel_runs(tmp_path, capsys):
    from lightjax.train.trainer import train

    train(run_config(tmp_path, max_steps=3, save_every=0), tmp_path / "run")
    assert "Attention kernel: einsum (auto: CPU)." in capsys.readouterr().out
