"""The same training step, and the same decoding, in PyTorch, for `scripts/benchmark.py --vs_torch`.

The run's architecture is built by `transformers` from the Hugging Face config that lightjax exports
for it (`GPTNeoXForCausalLM` for `baseline-tiny` and the Pythia presets, `LlamaForCausalLM` for the
Llama ones, ...), in float32, and trained the way lightjax trains it: next-token cross-entropy over
the same batch shape, gradients clipped to `optim.clip_norm`, torch's AdamW with the run's betas, eps
and weight decay (matrices decayed; biases, norm scales and, when `optim.no_decay` names them, the
embeddings not). The learning-rate schedule is left out: it costs nothing per step.

torch and transformers are optional dependencies (the `dev` extra); without them this is one error.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from typing import Any

from lightjax.convert.hf_config import config_to_hf
from lightjax.model.config import ModelConfig
from lightjax.runtime.packages import missing_package_message
from lightjax.train.config import resolve_model_config


def _import_torch() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ModuleNotFoundError as e:
        raise RuntimeError(f"--vs_torch needs torch and transformers: {missing_package_message(e)}.") from None
    return torch, transformers


# transformers' names for dropout on the embeddings and the residual branches, where lightjax's
# ModelConfig.dropout applies it (GPT-NeoX: hidden_dropout; Llama-style models have none).
_RESIDUAL_DROPOUT = ("hidden_dropout", "resid_pdrop", "embd_pdrop")


def build_torch_model(cfg: ModelConfig, seed: int = 0) -> Any:
    """`cfg`'s architecture as a `transformers` causal LM, float32, randomly initialised, with `cfg`'s
    dropout where the family has it, so that a training step does the same work as lightjax's."""
    torch, transformers = _import_torch()
    hf = config_to_hf(cfg)
    hf_config = transformers.AutoConfig.for_model(**hf)
    for name in _RESIDUAL_DROPOUT:
        if hasattr(hf_config, name):
            setattr(hf_config, name, cfg.dropout)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(hf_config, torch_dtype=torch.float32)


def _adamw(torch: Any, model: Any, optim: Any) -> Any:
    no_decay_embeddings = "embedding" in tuple(optim.no_decay)
    embeddings = {id(model.get_input_embeddings().weight)}
    decay, keep = [], []
    for p in model.parameters():
        if p.ndim < 2 or (no_decay_embeddings and id(p) in embeddings):
            keep.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.b1, optim.b2), eps=optim.eps)


def benchmark_torch_train_step(config: Any, steps: int = 10, warmup: int = 2) -> dict[str, Any]:
    """Median time of a PyTorch training step (forward, loss, backward, clipping, AdamW) of the config's
    architecture and batch shape on this machine's CPU, with every core."""
    torch, _ = _import_torch()
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = resolve_model_config(config)
    model = build_torch_model(cfg).train()
    optimizer = _adamw(torch, model, config.optim)
    t, seq = config.train, config.data.seq_len
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (t.global_batch_size, seq + 1), generator=generator)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step() -> float:
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.optim.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.clip_norm)
        optimizer.step()
        return float(loss)  # waits for the step, as lightjax's benchmark waits for its metrics

    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    return {"framework": f"torch {torch.__version__}", "model": cfg.name,
            "hf_class": type(model).__name__, "attention": model.config._attn_implementation,
            "threads": torch.get_num_threads(), "global_batch_size": t.global_batch_size, "seq_len": seq,
            "step_ms": step_s * 1e3, "step_ms_all": [x * 1e3 for x in times],
            "tokens_per_s": t.global_batch_size * seq / step_s, "final_loss": loss}


def benchmark_torch_generate(config: Any, batch: int, prompt_len: int = 16, new_tokens: int = 128,
                             repeats: int = 3) -> dict[str, Any]:
    """Decode speed of the config's architecture in `transformers` (`generate`, greedy, its KV cache,
    float32, every core): new tokens/s for `batch` random prompts of `prompt_len` tokens, all
    `new_tokens` of them produced (no EOS), median of `repeats` after an untimed run. The same
    figures as lightjax.perf.benchmark.benchmark_generate."""
    torch, _ = _import_torch()
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = resolve_model_config(config)
    model = build_torch_model(cfg).eval()
    model.generation_config.eos_token_id = None  # every row runs to new_tokens, as on lightjax's side
    new_tokens = min(new_tokens, cfg.block_size - prompt_len)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=generator)

    def run() -> Any:
        with torch.inference_mode():
            return model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    start = time.perf_counter()
    run()
    first_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    produced = out[:, prompt_len:].numel()
    return {"framework": f"torch {torch.__version__}", "hf_class": type(model).__name__,
            "attention": model.config._attn_implementation, "threads": torch.get_num_threads(), "model": cfg.name,
            "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens, "seconds": seconds,
            "tokens_per_sec": produced / seconds, "ms_per_step": 1e3 * seconds / new_tokens, "first_call_s": first_s}


def side_by_side(benchmark: list[str], rounds: int = 2, timeout_s: float = 3600,
                 key: str = "step_ms") -> dict[str, Any]:
    """Alternate lightjax's and PyTorch's benchmarks of the same config, each in its own process (so
    each has every core to itself, and neither framework's threads idle beside the other's), for
    `rounds` rounds. `benchmark` is the benchmark command for lightjax; `--torch` makes it PyTorch's.
    Each side's figure is the median over its rounds of their `key` (milliseconds per step)."""
    results: dict[str, list[dict[str, Any]]] = {"lightjax": [], "torch": []}
    for _ in range(rounds):
        for side, extra in (("lightjax", []), ("torch", ["--torch"])):
            out = subprocess.run([*benchmark, *extra, "--json"], capture_output=True, text=True, timeout=timeout_s)
            if out.returncode != 0:
                raise RuntimeError(f"the {side} benchmark failed: {(out.stderr.strip() or out.stdout.strip())[-600:]}")
            results[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    medians = {side: statistics.median(r[key] for r in runs) for side, runs in results.items()}
    return {"rounds": results, "lightjax_step_ms": medians["lightjax"], "torch_step_ms": medians["torch"],
            "speedup": medians["torch"] / medians["lightjax"]}
