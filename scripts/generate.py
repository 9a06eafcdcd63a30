"""Sample text from a trained run, or from a Hugging Face checkpoint converted on the fly.

    python scripts/generate.py --workdir runs/baseline --prompt "ROMEO:" --num_samples 3
    python scripts/generate.py --workdir runs/baseline --step 1000 --prompt "ROMEO:" --prompt "JULIET:"
    python scripts/generate.py --hf_dir path/to/hf_model --prompt "The capital of France is" --temperature 0
    python scripts/generate.py --export_dir exports/qwen3 --prompt "Hello" --temperature 0
    python scripts/generate.py --workdir runs/lora --instruction --prompt "Name three primes." --temperature 0

Prints each sample, then decoding tokens/s (the first call compiles; it is timed separately).
"""

import sys
import time

from absl import flags

from lightjax.runtime.cli import define_step_flag

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (its latest checkpoint, or --step).")
_STEP = define_step_flag()
_HF_DIR = flags.DEFINE_string("hf_dir", None, "A Hugging Face checkpoint directory instead of --workdir.")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "An export directory (scripts/export.py or convert_hf.py "
                                  "import) instead of --workdir.")
_PROMPT = flags.DEFINE_multi_string("prompt", ["\n"], "Prompt text; repeat the flag for several prompts.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples per prompt (generated together as one batch).",
                                    lower_bound=1)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 0, "Tokens to generate per sample (0: as many as the model's "
                                "block_size leaves after the longest prompt).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 200, "Sample among the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: the smallest set with this probability mass.")
_STOP = flags.DEFINE_multi_string("stop", [], "Cut each sample before this string (repeatable).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_INSTRUCTION = flags.DEFINE_bool("instruction", False, "--workdir of a fine-tuning run: each prompt is an "
                                 "instruction, rendered with the run's data.prompt_style as in training.")


def prompt_token_ids(prompts, tokenizer, config):
    """Each prompt's ids; with --instruction rendered and encoded as the run's training prompts were."""
    if not _INSTRUCTION.value:
        return prompts, [tokenizer.encode(p).tolist() for p in prompts]
    from lightjax.data.examples import prompt_ids
    from lightjax.data.prompts import PromptStyle
    from lightjax.data.records import is_instruction_source

    if config is None:
        raise ValueError("--instruction needs --workdir (the prompt style is the run's data.prompt_style).")
    if not is_instruction_source(config.data.source):
        raise ValueError(f"--instruction: the run trained on data.source={config.data.source!r}, not on instruction "
                         "records (json:/jsonl:); leave out --instruction to continue plain text.")
    style = PromptStyle(config.data.get("prompt_style", "alpaca"), config.data.tokenizer)
    rendered = [style.prompt(p) for p in prompts]
    return rendered, [prompt_ids(p, tokenizer).tolist() for p in rendered]


def main(argv):
    del argv
    from lightjax.model.generate import cut_at_stop, generate
    from lightjax.train.checkpoint import CheckpointError
    from lightjax.train.load import load_model

    try:
        loaded = load_model(_WORKDIR.value, _STEP.value, _HF_DIR.value, _EXPORT_DIR.value)
        model, params, tokenizer, source, config = (loaded.model, loaded.params, loaded.tokenizer, loaded.description,
                                                    loaded.config)
        prompts = [p for p in _PROMPT.value for _ in range(_NUM_SAMPLES.value)]
        prompts, ids = prompt_token_ids(prompts, tokenizer, config)
        max_new = _MAX_NEW.value or model.config.block_size - max(len(i) for i in ids)
        kwargs = dict(temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                      eos_id=tokenizer.eos_id, seed=_SEED.value, vocab_size=tokenizer.vocab_size)
        start = time.perf_counter()
        generate(model, params, ids, max_new, **kwargs)  # compiles the decode program, timed apart
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        new = generate(model, params, ids, max_new, **kwargs)
        seconds = time.perf_counter() - start
    except (OSError, ValueError, KeyError, CheckpointError) as e:
        sys.exit(f"generate: {e}")
    print(f"# {source}")
    for prompt, tokens in zip(prompts, new, strict=True):
        print(f"--- {prompt!r}\n{prompt}{cut_at_stop(tokenizer.decode(tokens), _STOP.value)}")
    count = sum(len(t) for t in new)
    print(f"--- {count} new tokens in {seconds:.2f} s: {count / seconds:,.1f} tokens/s decoding a batch of "
          f"{len(prompts)} (compiling and a first run took {compile_s:.1f} s)")


if __name__ == "__main__":
    from lightjax.runtime.cli import run_script

    run_script(main, "generate")
