"""tests/data/tiny-llama-hf, the Hugging Face directory that CI's bare-install stage imports without torch:
lightjax reads it as transformers does (logits and token ids)."""

import jax.numpy as jnp
import numpy as np

from lightjax.convert.hf import load_hf_checkpoint
from lightjax.data.tokenizers import load_hf_tokenizer
from lightjax.model.gpt import GPT
from tests.helpers import ROOT, require_hf

TINY_HF = ROOT / "tests" / "data" / "tiny-llama-hf"


def test_the_bare_stages_hf_directory_reads_as_transformers_reads_it():
    torch, transformers = require_hf()
    text = "Hello, world! The quick brown fox."
    reference = transformers.AutoTokenizer.from_pretrained(TINY_HF)
    ids = [int(i) for i in load_hf_tokenizer(TINY_HF).encode(text)]
    assert ids == reference(text)["input_ids"]
    cfg, params = load_hf_checkpoint(TINY_HF)
    logits = GPT(cfg).apply({"params": params}, jnp.asarray([ids], jnp.int32))[..., : cfg.vocab_size]
    model = transformers.AutoModelForCausalLM.from_pretrained(TINY_HF).eval()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(np.asarray(logits), want, atol=1e-5, rtol=0)
