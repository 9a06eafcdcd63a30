import pytest

from lightjax.config import ModelConfig

REQUIRED_PRESETS = ["pythia-14m", "pythia-31m", "pythia-70m", "pythia-160m", "pythia-410m", "pythia-1b",
                    "tiny-llama-1.1b", "SmolLM2-135M", "Llama-3.2-1B", "baseline-tiny"]


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
    with pytest.raises(ValueError, match=r"mlp_class_name='SwiGLU' is not one of 'GptNeoxMLP', 'LLaMAMLP'"):
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
