"""Instruction data: records, prompt styles, the response-only loss mask, padding and packing."""

import json

import jax
import numpy as np
import pytest

from lightjax.data.examples import ExampleRows, encode_example, write_examples
from lightjax.data.pipeline import eval_batches, train_iterator
from lightjax.data.prompts import PromptStyle
from lightjax.data.records import Record, load_records
from lightjax.data.tokenizers import ByteTokenizer, CharTokenizer
from lightjax.model.gpt import GPT
from lightjax.train.loss import batch_nll
from tests.helpers import tiny_config

RECORDS = [{"instruction": "Add 2 and 3.", "output": "5"},
           {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
           {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]}]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_alpaca_prompts_with_and_without_input():
    style = PromptStyle("alpaca")
    prompt, response = style(Record(RECORDS[0]))
    assert prompt == ("Below is an instruction that describes a task. Write a response that appropriately completes "
                      "the request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n") and response == "5"
    prompt, response = style(Record(RECORDS[1]))
    assert prompt == ("Below is an instruction that describes a task, paired with an input that provides further "
                      "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                      "Translate to French.\n\n### Input:\ncat\n\n### Response:\n") and response == "chat"
    assert style(Record(RECORDS[2]))[0].endswith("### Instruction:\nHi\n\n### Response:\n")


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_chat_prompts_use_the_tokenizers_template(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>"}))
    prompt, response = PromptStyle("chat", f"hf:{tmp_path}")(Record(RECORDS[2]))
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert response == "Hello there<|im_end|>\n"
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="has no chat_template"):
        PromptStyle("chat", f"hf:{tmp_path}")


def test_records_split_off_validation_and_bad_records_are_named(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", RECORDS * 4)
    train, val = (load_records(f"jsonl:{path}", s, 0.25) for s in ("train", "validation"))
    assert len(train) == 9 and len(val) == 3 and val[0].where == f"{path}:10"
    write_jsonl(path, [RECORDS[0], {"instruction": "Say nothing.", "output": "  "}])
    (record,) = load_records(f"jsonl:{path}", "validation", 0.5)
    with pytest.raises(ValueError, match=f"^{path}:2: the response is empty"):
        PromptStyle("alpaca")(record)
    write_jsonl(path, [RECORDS[0], {"prompt": "x", "output": "y"}])
    (record,) = load_records(f"jsonl:{path}", "validation", 0.5)
    with pytest.raises(ValueError, match=f"^{path}:2: a record needs 'instruction' and 'output'"):
        PromptStyle("alpaca")(record)


def examples_file(tmp_path, records, tokenizer):
    path = tmp_path / "train.examples.npz"
    write_examples([Record(r) for r in records], PromptStyle("alpaca"), tokenizer, path)
    return path


def test_the_loss_counts_response_tokens_only(tmp_path):
    """batch_nll over a padded batch equals the mean NLL of the response tokens, computed by hand from
    the logits and each example's own prompt and response ids."""
    tokenizer = ByteTokenizer()
    rows = ExampleRows(examples_file(tmp_path, RECORDS, tokenizer), seq_len=240)  # every example fits
    batch = next(eval_batches(rows, 3, (0, 1)))
    cfg = tiny_config(block_size=256, vocab_size=tokenizer.vocab_size, padding_multiple=32)
    model = GPT(cfg)
    params = model.init(jax.random.PRNGKey(0), batch["tokens"][:, :-1])["params"]
    nll_sum, _, mask = batch_nll(model, params, batch)
    logp = jax.nn.log_softmax(model.apply({"params": params}, batch["tokens"][:, :-1]), -1)
    want = []
    for row, record in enumerate(RECORDS):
        prompt, response = PromptStyle("alpaca")(Record(record))
        n_prompt = len(tokenizer.encode(prompt)) + (tokenizer.bos_id is not None)
        ids, _ = encode_example(prompt, response, tokenizer)
        want += [-float(logp[row, t - 1, ids[t]]) for t in range(n_prompt, len(ids))]
    assert float(mask.sum()) == len(want) == sum(len(r["output"]) if "output" in r else 11 for r in RECORDS) + 3
    np.testing.assert_allclose(float(nll_sum) / float(mask.sum()), np.mean(want), rtol=1e-6)


def test_packing_fills_rows_with_whole_examples_and_keeps_their_masks(tmp_path):
    tokenizer = CharTokenizer.from_text("".join(chr(c) for c in range(32, 127)) + "\n")
    path = examples_file(tmp_path, RECORDS * 3, tokenizer)
    padded, packed = ExampleRows(path, 400), ExampleRows(path, 400, pack=True)
    assert len(padded) == 9 and len(packed) < len(padded)
    assert sum(int(padded[i]["mask"].sum()) for i in range(len(padded))) == \
        sum(int(packed[i]["mask"].sum()) for i in range(len(packed)))
    first = packed[0]
    n = len(padded.tokens[padded.starts[0]: padded.ends[0]])  # the first example's length
    np.testing.assert_array_equal(first["tokens"][:n], padded[0]["tokens"][:n])
    np.testing.assert_array_equal(first["tokens"][n: 2 * n], padded[1]["tokens"][:n])
    assert first["mask"][n - 1] == 0  # the next example's first token is prompt, not a target


def test_training_batches_carry_the_mask(tmp_path):
    rows = ExampleRows(examples_file(tmp_path, RECORDS * 4, ByteTokenizer()), 200)
    batch = next(train_iterator(rows, 4, seed=0, shard=(0, 1)))
    assert batch["tokens"].shape == (4, 201) and batch["mask"].shape == (4, 200)
    assert 0 < batch["mask"].sum() < batch["mask"].size
