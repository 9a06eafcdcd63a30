"""Writes tests/data/tiny-llama-hf/: a random 2-layer Llama and a byte-level BPE tokenizer, saved by
`transformers` itself (`save_pretrained`), as a Hugging Face model directory is on the Hub. CI's
bare-install stage imports it with `scripts/convert_hf.py import` where torch is not installed;
tests/test_hf_data.py checks that lightjax's import computes the same logits as transformers.

    python tests/data/make_tiny_llama_hf.py   # needs torch and transformers (pip install -e ".[torch]")
"""

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

OUT = Path(__file__).parent / "tiny-llama-hf"
TEXT = Path(__file__).parent / "tiny_corpus.txt"


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(TEXT)], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def main() -> None:
    tok = tokenizer()
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # every weight random, norms included, so no tensor can be dropped unnoticed
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn_like(p))
    model.save_pretrained(OUT)
    tok.save_pretrained(OUT)


if __name__ == "__main__":
    main()
