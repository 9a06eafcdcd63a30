"""Every supported Hugging Face family against `transformers`: a random tiny HF model of that
architecture, saved as the Hub saves it, is imported with logits equal to transformers' (1e-5 in
float32; 3e-5 where said), exported back bit-equal, and a random lightjax model exported to HF loads in
`AutoModelForCausalLM.from_pretrained` with the same logits. (GPT-NeoX and Llama variants: test_hf_parity.py.)"""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from lightjax.convert.hf import (
    load_hf_checkpoint,
    params_from_hf,
    params_to_hf,
    read_hf_state_dict,
    save_hf_checkpoint,
)
from lightjax.model.gpt import GPT
from tests.helpers import VOCAB, random_hf_model, require_hf

# family -> (transformers class prefix, config kwargs beyond random_hf_model's, logits tolerance)
FAMILIES = {
    "mistral": ("Mistral", dict(num_key_value_heads=2, sliding_window=4), 1e-5),
    # Mixtral: the router's top-2 picks and softmax add roundoff of their own.
    "mixtral": ("Mixtral", dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2), 3e-5),
    "phi": ("Phi", dict(num_key_value_heads=2), 1e-5),
    "phi3": ("Phi3", dict(num_key_value_heads=2, pad_token_id=None, bos_token_id=None, eos_token_id=None), 1e-5),
    "gemma": ("Gemma", dict(num_key_value_heads=1, head_dim=16), 1e-5),
    # Gemma 2 and 3: tanh soft-capping and (1 + w) norms in float32 differ from ours in the last bits.
    "gemma2": ("Gemma2", dict(num_key_value_heads=2, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                              attn_logit_softcapping=2.0, final_logit_softcapping=3.0), 3e-5),
    "gemma3": ("Gemma3Text", dict(num_key_value_heads=2, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                                  layer_types=["sliding_attention", "full_attention"]), 3e-5),
    "qwen2": ("Qwen2", dict(num_key_value_heads=2), 1e-5),
    "qwen2-yarn": ("Qwen2", dict(num_key_value_heads=2, rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=16)), 1e-5),
    "qwen3": ("Qwen3", dict(num_key_value_heads=2, head_dim=16), 1e-5),
    "olmo2": ("Olmo2", dict(num_key_value_heads=2), 1e-5),
    "falcon": ("Falcon", dict(multi_query=True, ffn_hidden_size=64), 1e-5),
    "falcon-new": ("Falcon", dict(new_decoder_architecture=True, num_kv_heads=2, ffn_hidden_size=64), 1e-5),
}


@pytest.fixture(scope="module")
def hf():
    return require_hf()


def _hf_logits(torch, model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def _random_params(cfg, seed=1):
    """A lightjax model's parameters with every leaf random (norm scales and biases included)."""
    params = nn.unbox(GPT(cfg).init(jax.random.key(seed), np.zeros((1, 8), np.int32))["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (np.asarray(x) + 0.1 * rng.standard_normal(x.shape)).astype(np.float32), params)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_import_export(hf, tmp_path, family):
    torch, transformers = hf
    prefix, kwargs, atol = FAMILIES[family]
    causal_lm = f"{prefix.removesuffix('Text')}ForCausalLM"
    model = random_hf_model(hf, f"{prefix}Config", causal_lm, **kwargs)
    model.save_pretrained(tmp_path / "hf")
    model_type = json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"]
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 16))

    # HF -> lightjax: the same logits.
    cfg, params = load_hf_checkpoint(tmp_path / "hf")
    want = _hf_logits(torch, model, tokens)
    got = np.asarray(jax.jit(GPT(cfg).apply)({"params": params}, tokens))
    assert np.abs(want).max() > 0.2  # the comparison is not between near-zero numbers
    print(f"{family}: max |logits diff| = {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)

    # HF -> lightjax -> HF: every tensor back, bit-equal.
    original = read_hf_state_dict(tmp_path / "hf")
    back = params_to_hf(params_from_hf(original, cfg, model_type), cfg, model_type)
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and np.array_equal(back[name], tensor), name

    # lightjax -> HF: a random lightjax model, saved, loads into transformers with the same logits.
    ours = _random_params(cfg)
    save_hf_checkpoint(tmp_path / "export", ours, cfg, model_type, {"eos_token_id": 3, "vocab_size": 1})
    written = json.loads((tmp_path / "export" / "config.json").read_text())
    assert written["eos_token_id"] == 3 and written["vocab_size"] == cfg.padded_vocab_size  # only token ids pass
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert type(loaded).__name__ == causal_lm
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    want = np.asarray(GPT(cfg).apply({"params": ours}, tokens))
    np.testing.assert_allclose(_hf_logits(torch, loaded.eval(), tokens), want, atol=atol, rtol=0)
