"""scripts/benchmark.py --vs_torch: the PyTorch model it times is the run's architecture, and the
side-by-side run prints both figures and their ratio."""

import re

import numpy as np
import pytest

from lightjax.model.gpt import abstract_params, count_params
from lightjax.perf.vs_torch import build_torch_model
from lightjax.train.config import resolve_model_config
from tests.helpers import preset_run_config, require_hf, run_script, tiny_run_config

TINY = ["--config", "configs/baseline.py", "--config.model.n_layer=1", "--config.model.n_embd=64",
        "--config.model.n_head=4", "--config.data.seq_len=32", "--config.train.global_batch_size=8",
        "--steps=2", "--warmup=1"]


@pytest.mark.parametrize("config", [tiny_run_config("pythia"), preset_run_config("SmolLM2-135M")],
                         ids=["gpt-neox", "llama"])
def test_torch_model_is_the_runs_architecture(config):
    require_hf()
    torch_model = build_torch_model(resolve_model_config(config))
    want = {"pythia-14m": "GPTNeoXForCausalLM", "SmolLM2-135M": "LlamaForCausalLM"}[config.model.name]
    assert type(torch_model).__name__ == want
    torch_params = sum(p.numel() for p in torch_model.parameters())
    assert torch_params == count_params(abstract_params(resolve_model_config(config)))


def test_torch_model_drops_out_as_the_run_does():
    """The timed PyTorch step does the run's dropout (GPT-NeoX: on the embeddings and residual branches)."""
    require_hf()
    config = tiny_run_config("pythia")
    config.model.dropout = 0.2
    assert build_torch_model(resolve_model_config(config)).config.hidden_dropout == 0.2


@pytest.mark.shakespeare  # the baseline config's data keys point at it, though the benchmark reads none
def test_vs_torch_prints_both_and_the_ratio():
    require_hf()
    out = run_script("benchmark.py", *TINY, "--vs_torch", "--rounds=1", timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    torch_ms = re.search(r"torch [\d.]+\S* GPTNeoXForCausalLM: [\d.]+ ms -> ([\d.]+) ms/step", out.stdout)
    jax_ms = re.search(r"lightjax \(1 cpu device\(s\)\): [\d.]+ ms -> ([\d.]+) ms/step", out.stdout)
    ratio = re.search(r"lightjax speed: ([\d.]+)x PyTorch's", out.stdout)
    assert torch_ms and jax_ms and ratio, out.stdout
    t, j = float(torch_ms.group(1)), float(jax_ms.group(1))
    rounding = t / j * (0.05 / t + 0.05 / j) + 0.005  # the printed figures are rounded to 0.1 ms and 0.01x
    assert float(ratio.group(1)) == pytest.approx(t / j, abs=rounding)
    assert np.isfinite(float(ratio.group(1)))


@pytest.mark.shakespeare
def test_vs_torch_decoding_prints_both_and_the_ratios():
    require_hf()
    out = run_script("benchmark.py", *TINY, "--generate=1,2", "--vs_torch", "--rounds=1", timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "greedy decoding, 128 new tokens after 16-token prompts" in out.stdout, out.stdout
    rows = re.findall(r"batch +(\d+): torch ([\d.]+) ms per step \(([\d,]+) tok/s\), lightjax ([\d.]+) ms per step "
                      r"\(([\d,]+) tok/s\): lightjax speed ([\d.]+)x", out.stdout)
    assert [r[0] for r in rows] == ["1", "2"], out.stdout
    for batch, torch_ms, _, jax_ms, jax_tok, ratio in rows:
        t, j = float(torch_ms), float(jax_ms)
        assert float(ratio) == pytest.approx(t / j, abs=t / j * (0.005 / t + 0.005 / j) + 0.005)
        # tokens/s from the unrounded time; the printed time is rounded to 0.01 ms
        assert float(jax_tok.replace(",", "")) == pytest.approx(1e3 * int(batch) / j, rel=0.005 / j + 0.01, abs=1)
    assert re.search(r"a step at batch 2 costs [\d.]+x one at batch 1 in lightjax \([\d.]+x in torch\)", out.stdout)
