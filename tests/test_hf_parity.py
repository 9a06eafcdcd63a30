"""lightjax against Hugging Face `transformers`: logits of converted random-init models, parameter
counts of the presets, checkpoint loading. Skipped locally without torch/transformers; in CI
(LIGHTJAX_REQUIRE_HF=1) a missing install fails instead."""

import dataclasses

import jax
import numpy as np
import pytest

from lightjax.convert.hf import config_from_hf, config_to_hf, load_hf_checkpoint, params_from_hf
from lightjax.model.config import ModelConfig
from lightjax.model.gpt import GPT, abstract_params, count_params
from tests.helpers import VOCAB, random_hf_model, require_hf


@pytest.fixture(scope="module")
def hf():
    return require_hf()


def _assert_logits_match(hf, model, params=None, cfg=None, atol=1e-5):
    torch, _ = hf
    state_dict = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    cfg = cfg or config_from_hf(model.config.to_dict())
    params = params if params is not None else params_from_hf(state_dict, cfg)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 16))
    with torch.no_grad():
        want = model(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(jax.jit(GPT(cfg).apply)({"params": params}, tokens))
    assert got.shape == (2, 16, cfg.padded_vocab_size) == want.shape
    assert np.abs(want).max() > 0.2  # the comparison is not between near-zero numbers
    print(f"max |logits diff| = {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)
    return cfg


@pytest.mark.parametrize("rotary_pct", [0.25, 1.0])
@pytest.mark.parametrize("parallel_residual", [True, False])
def test_gpt_neox_logits(hf, rotary_pct, parallel_residual):
    model = random_hf_model(hf, "GPTNeoXConfig", "GPTNeoXForCausalLM", rotary_pct=rotary_pct,
                             use_parallel_residual=parallel_residual)
    cfg = _assert_logits_match(hf, model)
    assert (cfg.rotary_percentage, cfg.parallel_residual) == (rotary_pct, parallel_residual)


LLAMA_CASES = {
    "mha": dict(num_key_value_heads=4),
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "gqa-untied": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "llama3.1-rope": dict(num_key_value_heads=2, rope_theta=10000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64)),
    "linear-rope": dict(num_key_value_heads=2, rope_scaling=dict(rope_type="linear", factor=4.0)),
    "head_dim-16-bias": dict(num_key_value_heads=2, head_dim=16, attention_bias=True, mlp_bias=True),
}


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_logits(hf, case):
    model = random_hf_model(hf, "LlamaConfig", "LlamaForCausalLM", **LLAMA_CASES[case])
    cfg = _assert_logits_match(hf, model)
    assert cfg.n_query_groups == model.config.num_key_value_heads
    assert cfg.tie_embeddings == model.config.tie_word_embeddings
    if case == "llama3.1-rope":
        assert cfg.rope_adjustments["original_max_seq_len"] == 64


@pytest.mark.parametrize("name", ModelConfig.names())
def test_preset_parameter_counts_match_hf(hf, name):
    torch, transformers = hf
    cfg = ModelConfig.from_name(name)
    with torch.device("meta"):  # shapes only: no memory is allocated for the weights
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**config_to_hf(cfg)))
    assert count_params(abstract_params(cfg)) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ModelConfig.names())
def test_config_round_trip_through_hf(name):
    cfg = ModelConfig.from_name(name)
    back = config_from_hf(config_to_hf(cfg))
    # The HF config holds the padded vocabulary as vocab_size; everything else must survive.
    ignore = {"name", "vocab_size", "padding_multiple", "_derived"}
    for f in dataclasses.fields(cfg):
        if f.name not in ignore:
            assert getattr(back, f.name) == getattr(cfg, f.name), f.name
    assert back.padded_vocab_size == cfg.padded_vocab_size


@pytest.mark.parametrize("shard", [False, True])
def test_load_hf_checkpoint_from_safetensors(hf, tmp_path, shard):
    torch, _ = hf
    model = random_hf_model(hf, "LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2, tie_word_embeddings=True)
    model.save_pretrained(tmp_path, max_shard_size="20KB" if shard else "10GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == shard
    cfg, params = load_hf_checkpoint(tmp_path)
    _assert_logits_match(hf, model, params=params, cfg=cfg)


def test_load_bfloat16_gpt_neox_checkpoint(hf, tmp_path):
    torch, _ = hf
    model = random_hf_model(hf, "GPTNeoXConfig", "GPTNeoXForCausalLM").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    cfg, params = load_hf_checkpoint(tmp_path)
    qkv = model.gpt_neox.layers[1].attention.query_key_value.weight.detach().float().numpy()
    got = np.asarray(params["h_1"]["attn"]["qkv"]["kernel"])
    assert got.dtype.name == "bfloat16"
    np.testing.assert_array_equal(got.astype(np.float32), qkv.T.reshape(32, 4, 3, 8))
    head = model.get_output_embeddings().weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(params["lm_head"]["kernel"]).astype(np.float32), head.T)


def test_unsupported_architecture_lists_supported():
    supported = "llama, gpt_neox, mistral, qwen2, qwen3, mixtral, gemma, gemma2, gemma3_text, olmo2, phi, falcon, phi3"
    with pytest.raises(ValueError, match=rf"model_type 'mamba' is not supported; supported: {supported}\."):
        config_from_hf({"model_type": "mamba"})
    with pytest.raises(ValueError, match=rf"model_type 'mamba' is not supported; supported: {supported}\."):
        config_to_hf(ModelConfig.from_name("pythia-14m"), model_type="mamba")


def test_export_names_what_does_not_fit():
    cfg = ModelConfig.from_name("gemma-2-2b")
    with pytest.raises(ValueError, match=r"does not fit HF model_type 'llama': .*post_attention_norm=True "
                                         r"\(needs False\)"):
        config_to_hf(cfg, model_type="llama")
    odd = ModelConfig.from_name("pythia-14m", norm_class_name="RMSNorm")
    with pytest.raises(ValueError, match=r"fits no supported HF architecture .* the closest, 'gpt_neox', would need: "
                                         r"norm_class_name='RMSNorm' \(needs 'LayerNorm'\)"):
        config_to_hf(odd)


def test_missing_and_unknown_weight_names_are_listed(hf):
    model = random_hf_model(hf, "LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2)
    cfg = config_from_hf(model.config.to_dict())
    state_dict = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    state_dict.pop("model.layers.1.mlp.up_proj.weight")
    state_dict["model.layers.1.mlp.extra.weight"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"missing tensors \['model\.layers\.1\.mlp\.up_proj\.weight'\]; "
                                         r"unexpected tensors \['model\.layers\.1\.mlp\.extra\.weight'\]"):
        params_from_hf(state_dict, cfg)


def test_shape_mismatch_is_reported(hf):
    model = random_hf_model(hf, "GPTNeoXConfig", "GPTNeoXForCausalLM")
    state_dict = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    cfg = config_from_hf(model.config.to_dict()).replace(intermediate_size=48)
    with pytest.raises(ValueError, match=r"h_0/mlp/fc/kernel: checkpoint \[\(64, 32\)\] does not fit"):
        params_from_hf(state_dict, cfg)


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="No config.json in"):
        load_hf_checkpoint(tmp_path)


# The parameter counts the Hugging Face Hub shows for these checkpoints (safetensors "Model size").
PUBLISHED_COUNTS = {
    "Llama-3.1-8B": 8_030_261_248, "Mistral-7B-v0.1": 7_241_732_096, "Mixtral-8x7B-v0.1": 46_702_792_704,
    "falcon-7b": 6_921_720_704, "phi-2": 2_779_683_840, "gemma-2b": 2_506_172_416, "Qwen2.5-0.5B": 494_032_768,
}


@pytest.mark.parametrize("name", list(PUBLISHED_COUNTS))
def test_preset_sizes_match_the_published_checkpoints(name):
    assert count_params(abstract_params(ModelConfig.from_name(name))) == PUBLISHED_COUNTS[name]


@pytest.mark.parametrize("model_type,extra", [
    ("gemma2", {}), ("gemma3_text", {"sliding_window_pattern": 3}),
    ("qwen2", {"use_sliding_window": True, "max_window_layers": 2}),
])
def test_layer_types_are_derived_like_transformers_when_absent(hf, model_type, extra):
    """Older config.json files have no layer_types: which layers have a window follows transformers' rule."""
    _, transformers = hf
    config = transformers.AutoConfig.for_model(model_type, num_hidden_layers=6, sliding_window=8, **extra).to_dict()
    want = tuple(int(t == "sliding_attention") for t in config["layer_types"])
    assert 0 < sum(want) < 6  # some layers windowed, some not
    assert config_from_hf(config).sliding_window_indices == want
    legacy = {k: v for k, v in config.items() if k != "layer_types"}
    assert config_from_hf(legacy) == config_from_hf(config)


def test_falcon_config_with_its_original_key_names():
    """tiiuae/falcon-7b's config.json keys (n_head, n_layer) read like the in-library names."""
    hf = dict(model_type="falcon", hidden_size=4544, n_head=71, n_layer=32, vocab_size=65024, multi_query=True,
              parallel_attn=True, bias=False, alibi=False, new_decoder_architecture=False, layer_norm_epsilon=1e-5)
    cfg = config_from_hf(hf)
    want = ModelConfig.from_name("falcon-7b")
    assert (cfg.n_head, cfg.n_layer, cfg.n_query_groups, cfg.intermediate_size) == (71, 32, 1, 18176)
    assert count_params(abstract_params(cfg)) == count_params(abstract_params(want))
    with pytest.raises(ValueError, match="apply_residual_connection_post_layernorm=True is not supported"):
        config_from_hf(dict(hf, apply_residual_connection_post_layernorm=True))

