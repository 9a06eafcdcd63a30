"""scripts/benchmark.py --profile's attribution: op names to parts of the step, and a traced tiny step."""

import pytest

from lightjax.perf.profile import category, format_profile, profile_train_step
from tests.helpers import tiny_run_config


@pytest.mark.parametrize("op_name,want", [
    ("jit(step)/jvp(GPT)/GPT._blocks/h_3/mlp/fc/dot_general", "matmul: MLP"),
    ("jit(step)/transpose(jvp(GPT))/GPT._blocks/h_0/attn/qkv/dot_general", "matmul: attention qkv/proj"),
    ("jit(step)/jvp(GPT)/GPT._blocks/h_1/attn/bgms,bgsh->bgmh/dot_general", "attention core (scores, softmax, RoPE)"),
    ("jit(step)/jvp(GPT)/GPT._blocks/h_2/norm_1/reduce_sum", "norms"),
    ("jit(step)/transpose(jvp(loss))/exp", "loss"),
    ("jit(step)/optimizer/sqrt", "optimizer (clip, AdamW)"),
])
def test_op_names_map_to_parts_of_the_step(op_name, want):
    assert category(op_name) == want


def test_profile_of_a_tiny_step_covers_model_loss_and_optimizer():
    r = profile_train_step(tiny_run_config(), steps=1)
    parts = r["categories"]
    for part in ("matmul: MLP [forward]", "matmul: MLP [backward]", "norms [forward]", "loss [forward]",
                 "optimizer (clip, AdamW) [forward]"):
        assert parts.get(part, 0) > 0, (part, parts)
    assert sum(parts.values()) == pytest.approx(r["ops_ms"]) and r["step_ms"] > 0
    assert "| matmul: MLP [forward] |" in format_profile(r)
