import pytest

from lightjax.model.config import ModelConfig

REQUIRED_PRESETS = ["pythia-14m", "pythia-31m", "pythia-70m", "pythia-160m", "pythia-410m", "pythia-1b",
                    "tiny-llama-1.1b", "SmolLM2-135M", "Llama-3.2-1B", "baseline-tiny",
                    "Mistral-7B-v0.1", "Mixtral-8x7B-v0.1", "phi-1_5", "phi-2", "Phi-3-mini-4k-instruct", "gemma-2b",
                    "gemma-2-2b", "gemma-3-1b-it", "Qwen2.5-0.5B", "Qwen3-0.6B", "OLMo-2-1124-7B", "falcon-7b",
                    "stablelm-base-alpha-3b", "Llama-3.1-8B", "Llama-3.2-3B", "SmolLM2-360M"]


def test_presets_exist_and_build():
    assert set(REQUIRED_PRESETS) <= set(ModelConfig.names())
    for name in ModelConfig.names():
        cfg = ModelConfig.from_name(name)
        assert cfg.name == name
        assert cfg.n_head * cfg.head_size > 0 and cfg.padded_vocab_size >= cfg.vocab_size


def test_derived_values():
    cfg = ModelConfig.from_name("pythia-14m")
    assert (cfg.head_size, cfg.padded_vocab_size, cfg.n_query_groups, cfg.intermediate_size) == (32, 50304, 4, 512)
    assert cfg.rope_n_elem == 8  # 0.25 * 32
    llama = ModelConfig.from_name("tiny-llama-1.1b")
    assert (llama.head_size, llama.q_per_kv, llama.rope_n_elem, llama.padded_vocab_size) == (64, 8, 64, 32000)
    base = ModelConfig.from_name("baseline-tiny")
    assert (base.n_layer, base.n_head, base.n_embd, base.block_size, base.rope_n_elem) == (6, 6, 384, 256, 16)
    assert base.parallel_residual and base.bias and base.norm_class_name == "LayerNorm"


def test_overrides_and_replace():
    cfg = ModelConfig.from_name("pythia-14m", n_layer=2, vocab_size=100, padding_multiple=64)
    assert (cfg.n_layer, cfg.padded_vocab_size) == (2, 128)
    assert cfg.replace(n_embd=256).head_size == 64  # derived values are recomputed
    assert cfg == ModelConfig.from_name("pythia-14m", n_layer=2, vocab_size=100, padding_multiple=64)
    assert hash(ModelConfig.from_name("Llama-3.2-1B")) == hash(ModelConfig.from_name("Llama-3.2-1B"))


def test_n_embd_not_divisible_by_n_head():
    with pytest.raises(ValueError, match=r"ModelConfig\.n_embd=100 must be divisible by n_head=3"):
        ModelConfig(n_embd=100, n_head=3)


def test_n_head_not_divisible_by_n_query_groups():
    with pytest.raises(ValueError, match=r"ModelConfig\.n_head=8 must be divisible by n_query_groups=3"):
        ModelConfig(n_embd=64, n_head=8, n_query_groups=3)


def test_unknown_norm():
    with pytest.raises(ValueError, match=r"norm_class_name='BatchNorm' is not one of 'LayerNorm', 'RMSNorm'"):
        ModelConfig(n_embd=64, n_head=4, norm_class_name="BatchNorm")


def test_unknown_mlp():
    with pytest.raises(ValueError, match=r"mlp_class_name='SwiGLU' is not one of 'GptNeoxMLP', 'LLaMAMLP', 'GemmaMLP', "
                                         r"'LLaMAMoE'"):
        ModelConfig(n_embd=64, n_head=4, mlp_class_name="SwiGLU")


def test_unknown_preset_suggests_close_names():
    with pytest.raises(ValueError, match=r"Unknown model name 'pythia-14M'\. Did you mean 'pythia-14m'"):
        ModelConfig.from_name("pythia-14M")
    with pytest.raises(ValueError, match=r"Unknown model name 'gpt-5'"):
        ModelConfig.from_name("gpt-5")


def test_llama_mlp_needs_intermediate_size():
    with pytest.raises(ValueError, match=r"intermediate_size=None must be set for mlp_class_name='LLaMAMLP'"):
        ModelConfig(n_embd=64, n_head=4, mlp_class_name="LLaMAMLP")


def test_shared_attention_norm_needs_parallel_residual():
    with pytest.raises(ValueError, match=r"shared_attention_norm=True requires parallel_residual=True"):
        ModelConfig(n_embd=64, n_head=4, parallel_residual=False, shared_attention_norm=True)


def test_odd_rope_n_elem_and_bad_rope_adjustments():
    with pytest.raises(ValueError, match=r"rotary_percentage=0\.3 gives rope_n_elem=9"):
        ModelConfig(n_embd=128, n_head=4, rotary_percentage=0.3)
    with pytest.raises(ValueError, match=r"rope_adjustments=\{'scale': 2\} must have the keys"):
        ModelConfig(n_embd=64, n_head=4, rope_adjustments={"scale": 2})


@pytest.mark.parametrize("fields,message", [
    (dict(sliding_window_size=4, sliding_window_indices=(1, 0, 1)),
     r"sliding_window_indices=\(1, 0, 1\) must hold one 0 or 1 per layer \(n_layer=2\)"),
    (dict(sliding_window_indices=(1, 0)), r"sliding_window_indices=\(1, 0\) needs sliding_window_size to be set"),
    (dict(rope_indices=(0, 1)), r"rope_indices=\(0, 1\) needs rope_local_base_freq to be set"),
    (dict(mlp_class_name="LLaMAMoE", intermediate_size=64, n_expert=1, n_expert_per_token=1),
     r"n_expert=1 must be > 1 for mlp_class_name='LLaMAMoE'"),
    (dict(mlp_class_name="LLaMAMoE", intermediate_size=64, n_expert=4, n_expert_per_token=5),
     r"n_expert_per_token=5 must be in \[1, n_expert=4\]"),
    (dict(n_expert=4), r"n_expert=4 needs mlp_class_name='LLaMAMoE' \(is 'GptNeoxMLP'\)"),
    (dict(norm_unit_offset=True), r"norm_unit_offset=True needs norm_class_name='RMSNorm'"),
    (dict(norm_qk_type="full"), r"norm_qk_type='full' is not one of 'default', 'olmo2'"),
    (dict(attention_logit_softcapping=-1.0), r"attention_logit_softcapping=-1.0 must be positive \(or None\)"),
    (dict(rope_adjustments={"factor": 4.0, "beta_fast": 32}), r"rope_adjustments=.* must have the keys .*YaRN"),
])
def test_new_fields_are_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(n_layer=2, n_embd=64, n_head=4, **fields)


def test_lists_from_json_become_tuples():
    cfg = ModelConfig(n_layer=2, n_embd=64, n_head=4, sliding_window_size=4, sliding_window_indices=[1, 0])
    assert cfg.sliding_window_indices == (1, 0) and cfg.sliding_window(0) == 4 and cfg.sliding_window(1) is None
    assert hash(cfg) == hash(cfg.replace())

