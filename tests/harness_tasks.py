"""What the lm-evaluation-harness tests share: four local tasks (two multiple choice, one rolling
log-likelihood, one generation) written as the harness's YAML over JSON files, a byte-level BPE tokenizer
trained on their text, and tiny random Hugging Face models (GPT-NeoX, whose tokenizer adds nothing, and
Llama, whose tokenizer adds BOS) saved with it."""

import json
import random

from lightjax.train.tasks import metric, write_json_task
from tests.helpers import random_hf_model, require_hf

SUBJECTS = ["cat", "dog", "sun", "moon", "tree", "river", "king", "queen"]
COLORS = ["red", "blue", "green", "white"]
STORY = ("The king walked by the river and the queen sang to the moon. A dog ran after the cat under the "
         "old tree, and the sun rose red over the hills while the green river ran on to the sea. ")

# Documents of each task: {name: (rows, the task's YAML beyond its name and data)}.
TASKS = {
    # One-token answers after one question: the requests share their input rows.
    "toy_color": ([{"question": f"What color is the {s}?", "choices": COLORS, "answer": i % 4}
                   for i, s in enumerate(SUBJECTS)],
                  {"output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
                   "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
                   "metric_list": [metric("acc"), metric("acc_norm")]}),
    # Longer continuations; some documents have no context (the prefix token is their context).
    "toy_story": ([{"text": "" if i % 3 == 0 else f"The {s} walked by the",
                    "choices": ["river and sang", f"old {t} under the moon", "sea"], "answer": i % 3}
                   for i, (s, t) in enumerate(zip(SUBJECTS, reversed(SUBJECTS), strict=True))],
                  {"output_type": "multiple_choice", "doc_to_text": "{{text}}", "doc_to_choice": "{{choices}}",
                   "doc_to_target": "{{answer}}", "metric_list": [metric("acc"), metric("acc_norm")]}),
    # Texts longer than the model's 64 positions: several windows each. Random words, so that no two windows
    # hold the same tokens: the hf backend (lm-eval 0.4.13) reuses one window's logits for another with the
    # same tokens, and reads the wrong positions when the two split context and continuation differently.
    "toy_rolling": ([{"text": " ".join(random.Random(i).choices(STORY.split(), k=40 * (1 + i)))} for i in range(4)],
                    {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                     "metric_list": [metric("word_perplexity", "weighted_perplexity", False),
                                     metric("byte_perplexity", "weighted_perplexity", False),
                                     metric("bits_per_byte", "bits_per_byte", False)]}),
    "toy_generate": ([{"question": f"The {s} and the", "answer": "king"} for s in SUBJECTS],
                     {"output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
                      "generation_kwargs": {"until": ["\n", "."], "max_gen_toks": 12, "do_sample": False},
                      "metric_list": [metric("exact_match")]}),
}
TASK_NAMES = list(TASKS)


def write_tasks(folder):
    """The four tasks' YAML files and JSON data in `folder` (an lm_eval include_path)."""
    for name, (rows, spec) in TASKS.items():
        write_json_task(folder, name, {"test": rows}, spec)
    return folder


def corpus():
    """Every text the tasks hold, for training the tokenizer."""
    texts = [STORY]
    for rows, _ in TASKS.values():
        texts += [json.dumps(r) for r in rows]
    return texts


def write_tokenizer(folder, adds_bos):
    """A byte-level BPE of 320 ids (<pad> 0, <s> 1, </s> 2) with transformers' files; with `adds_bos` its
    post-processor puts <s> before every text, as a Llama tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus() * 4, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))
    return tok.get_vocab_size()


FAMILIES = {  # transformers' config and model classes, extra settings, whether the tokenizer adds BOS
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}, False),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 2}, True),
}


def write_hf_model(folder, family):
    """A random `family` model of 64 positions saved by transformers, with its tokenizer."""
    hf = require_hf()
    config_cls, model_cls, extra, adds_bos = FAMILIES[family]
    vocab = write_tokenizer(folder, adds_bos)
    model = random_hf_model(hf, config_cls, model_cls, vocab=vocab, bos_token_id=1, eos_token_id=2,
                            pad_token_id=0, **extra)
    model.save_pretrained(folder)
    return folder
