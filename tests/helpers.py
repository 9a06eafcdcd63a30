"""What the tests share: tiny model and run configs (one per block layout the model supports), the
local data path, config loading, script running and the Hugging Face gate."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightjax.model.config import ModelConfig
from lightjax.train.config import default_config

# The tiny model's two block layouts: 2 layers, 32 wide, small enough for float64 gradient checks.
TINY_FAMILIES = {
    # GPT-NeoX layout: parallel residual, partial rotary, LayerNorm, biases.
    "pythia": dict(name="tiny-pythia", block_size=32, vocab_size=96, padding_multiple=32, n_layer=2,
                   n_embd=32, n_head=4, rotary_percentage=0.25),
    # Llama layout: sequential residual, full rotary, RMSNorm, SwiGLU, GQA.
    "llama": dict(name="tiny-llama", block_size=32, vocab_size=96, padding_multiple=32, n_layer=2, n_embd=32,
                  n_head=4, n_query_groups=2, rotary_percentage=1.0, parallel_residual=False, bias=False,
                  norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=64),
}


def tiny_config(family: str = "pythia", **overrides) -> ModelConfig:
    return ModelConfig(**{**TINY_FAMILIES[family], **overrides})


def model_overrides(config, fields: dict) -> None:
    """Set config.model's keys to `fields` (the run's preset name stays)."""
    for k, v in fields.items():
        if k != "name" and v is not None:
            setattr(config.model, k, v)


def tiny_run_config(family="pythia", mesh=(1, 1, 1), **train):
    """A run of the tiny model at 64 wide with 8 heads, so that every mesh of 8 devices splits it."""
    c = default_config()
    c.model.name = "pythia-14m"
    wider = dict(n_embd=64, n_head=8) if family == "pythia" else dict(n_embd=64, n_head=8, n_query_groups=4,
                                                                         intermediate_size=128)
    model_overrides(c, {**TINY_FAMILIES[family], **wider})
    c.data.seq_len = 16
    c.optim.warmup_steps = 1
    c.train.max_steps = 20
    c.train.global_batch_size = 8
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def load_config_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(name: str, local_data: bool = True):
    """configs/<name>.py's get_config(), pointed at the local Tiny Shakespeare copy."""
    config = load_config_module(ROOT / "configs" / f"{name}.py").get_config()
    if local_data:
        config.data.local_path = str(SHAKESPEARE)
    return config


def script_env(root: Path = ROOT) -> dict[str, str]:
    """The environment scripts run in: the checkout at `root` importable, and one CPU device unless the
    script's --host_devices asks for more (not the tests' 8, nor one per core)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"], env["XLA_FLAGS"] = str(root), "--xla_force_host_platform_device_count=1"
    return env


def run_script(script: str, *args: str, devices: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """scripts/<script> in a subprocess with its own device count."""
    cmd = [sys.executable, f"scripts/{script}", *args, *([f"--host_devices={devices}"] if devices > 1 else [])]
    return subprocess.run(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=timeout)


def local_data_flags(workdir) -> list[str]:
    """Command-line flags that point a run at the local Tiny Shakespeare copy, prepared beside workdir."""
    return [f"--config.data.local_path={SHAKESPEARE}", f"--config.data.data_dir={Path(workdir).parent / 'tfds'}"]


def require_hf():
    """(torch, transformers) for parity tests. Skips locally when missing; fails when
    LIGHTJAX_REQUIRE_HF=1 (set by .ci/run), so CI can never pass by skipping them."""
    try:
        import torch
        import transformers
    except ImportError as e:
        if os.environ.get("LIGHTJAX_REQUIRE_HF") == "1":
            pytest.fail(f"LIGHTJAX_REQUIRE_HF=1 but the parity tests cannot import torch/transformers: {e}")
        pytest.skip(f"torch/transformers not installed: {e}")
    return torch, transformers


VOCAB = 100  # of the random Hugging Face models


def random_hf_model(hf, config_cls_name, model_cls_name, vocab=VOCAB, **config):
    """An HF model with every tensor random, norms and biases included, so that no weight can be
    dropped or transposed by the conversion without changing the logits."""
    torch, transformers = hf
    torch.manual_seed(0)
    hf_config = getattr(transformers, config_cls_name)(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, **config)
    model = getattr(transformers, model_cls_name)(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name or ".ln_" in name or name.startswith("transformer.ln_")  # Falcon: ln_*
            base = 1.0 if (is_norm and name.endswith("weight")) else 0.0
            p.copy_(base + 0.1 * torch.randn_like(p))
    return model


def tiny_preset(name: str, **overrides) -> ModelConfig:
    """Preset `name` shrunk to 2 layers of width 64, keeping every architectural switch (its windows,
    local RoPE and expert settings shrunk to fit), for training tests of each family."""
    cfg = ModelConfig.from_name(name)
    small = dict(n_layer=2, n_embd=64, n_head=4, n_query_groups=2, head_size=16, intermediate_size=128,
                 vocab_size=96, padded_vocab_size=None, padding_multiple=32, block_size=32)
    if cfg.n_expert:
        small.update(n_expert=4, n_expert_per_token=2, moe_intermediate_size=64)
    if cfg.sliding_window_size:
        small["sliding_window_size"] = 4
    if cfg.sliding_window_indices:
        small["sliding_window_indices"] = (1, 0)
    if cfg.rope_indices:
        small["rope_indices"] = (1, 0)
    if cfg.attention_scores_scalar:
        small["attention_scores_scalar"] = 24  # not head_size, so that the scale's source is tested
    return cfg.replace(**{**small, **overrides})


def preset_run_config(name: str, mesh=(1, 1, 1), **overrides):
    """tiny_run_config's training settings around `tiny_preset(name, **overrides)`."""
    c = tiny_run_config(mesh=mesh)
    c.model.name = name
    model_overrides(c, tiny_preset(name, **overrides).to_dict())
    return c
