"""Sampling from a GPT with a KV cache: one jitted program per (batch, prompt bucket, cache bucket).

Prompts of different lengths are left-padded to a common bucketed length, so that every row's next
token lands in the same cache slot; each row's RoPE positions start at its first real token and its
queries never see the padding (see lightjax/model/kv_cache.py). The prompt is processed in one forward pass
(prefill), then `lax.while_loop`s decode a token per iteration, feeding one token per row through the
model against the cache, until `max_new_tokens` or until every row has produced `eos_id`. The cache
is split into chunks of doubling size; one loop runs while its chunk fills, attending over the chunks
up to it, so that a step reads about as much of the cache as is filled. Each step writes its keys and
values into the cache in place and does no host work.

Sampling follows LitGPT's order: top-k, then temperature, then top-p (nucleus); temperature 0 is
greedy. The sampling settings and max_new_tokens are traced values, so changing them does not
recompile; only the batch size and the two length buckets do.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lightjax.model.config import ModelConfig
from lightjax.model.gpt import GPT, KVCache
from lightjax.runtime.sharding import Rules, with_mesh


def bucket(n: int, minimum: int = 16) -> int:
    """The next power of two >= n (at least `minimum`): lengths that share a compiled program."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def width_bucket(n: int, minimum: int = 16) -> int:
    """`n` rounded up to one of at most four widths per power of two (16, 20, 24, 28, 32, 40, ...): few
    compiled programs, at most a quarter of a row of padding."""
    if n <= minimum:
        return minimum
    step = max(1, 1 << ((n - 1).bit_length() - 3))
    return -(-n // step) * step


def top_k_filter(logits: jax.Array, k: jax.Array) -> jax.Array:
    """Keep the k largest logits of each row (k <= 0: all), the rest -inf. Ties with the k-th are kept."""
    vocab = logits.shape[-1]
    k = jnp.where(k <= 0, vocab, jnp.minimum(k, vocab))
    kth = jnp.take(-jnp.sort(-logits, axis=-1), k - 1, axis=-1)[..., None]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: jax.Array) -> jax.Array:
    """Keep the smallest set of most likely tokens whose probability mass reaches p (at least one)."""
    probs = jax.nn.softmax(logits, axis=-1)
    sorted_probs = -jnp.sort(-probs, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    kept = (mass_before < p) | (mass_before == 0)  # needed while the likelier ones hold less than p; the top always
    cutoff = jnp.min(jnp.where(kept, sorted_probs, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(probs < cutoff, -jnp.inf, logits)


def sample(logits: jax.Array, rng: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array) -> jax.Array:
    """Next tokens [B] from logits [B, V] (float32): top-k, temperature, top-p, then a draw; greedy
    (argmax) when temperature is 0. Greedy decoding skips the filters' sorts, which cost a CPU decode
    step more than the model does at small sizes."""

    def draw(logits: jax.Array) -> jax.Array:
        logits = top_k_filter(logits, top_k)
        scaled = logits / temperature
        scaled = jax.lax.cond(top_p < 1.0, lambda x: top_p_filter(x, top_p), lambda x: x, scaled)
        return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)

    logits = logits.astype(jnp.float32)
    return jax.lax.cond(temperature > 0, draw, lambda x: jnp.argmax(x, axis=-1).astype(jnp.int32), logits)


def _decode_loop(model: GPT, params: Any, prompt: jax.Array, start: jax.Array, rng: jax.Array, max_new: jax.Array,
              temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, vocab_limit: jax.Array, eos_id: jax.Array,
              stops: jax.Array, cache_len: int) -> tuple[jax.Array, jax.Array]:
    """(new tokens [B, cache_len - P], how many were produced) for left-padded prompts [B, P]. Only ids
    below `vocab_limit` are sampled: never the padding rows, nor ids a smaller tokenizer cannot decode.
    A row is done after a token of `stops` (a mask over the vocabulary; EOS among them) and then repeats
    `eos_id`; the loop ends when every row is done."""
    cfg = model.config
    B, P = prompt.shape
    vocab_mask = jnp.arange(cfg.padded_vocab_size) < vocab_limit

    def next_token(logits: jax.Array, i: jax.Array) -> jax.Array:
        logits = jnp.where(vocab_mask, logits[:, -1], -jnp.inf)
        return sample(logits, jax.random.fold_in(rng, i), temperature, top_k, top_p)

    lengths = attended_lengths(P, cache_len)
    cache = KVCache.empty(cfg, B, lengths, model.dtype, start, stacked=model.scan_layers)
    logits, cache = model.apply({"params": params}, prompt, cache.replace(length=lengths[0]), method="decode")
    token = next_token(logits, 0)
    out = jnp.zeros((B, cache_len - P), jnp.int32).at[:, 0].set(token)
    done = stops[token]

    def running(carry: tuple) -> jax.Array:
        i, _, _, _, done = carry
        return (i < max_new) & ~jnp.all(done)

    def body(carry: tuple) -> tuple:
        i, token, cache, out, done = carry
        logits, cache = model.apply({"params": params}, token[:, None], cache, method="decode")
        token = jnp.where(done, eos_id, next_token(logits, i))  # finished rows repeat EOS
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], i, axis=1)
        return i + 1, token, cache, out, done | stops[token]

    # One loop per chunk of the cache: while the cache holds fewer than `length` tokens, the steps
    # write into the chunk that ends there and attend over the chunks up to it.
    carry = (jnp.int32(1), token, cache, out, done)
    for length in lengths:
        carry = jax.lax.while_loop(lambda c, n=length: running(c) & (c[2].index < n), body,
                                   carry[:2] + (carry[2].replace(length=length),) + carry[3:])
    n, _, _, out, _ = carry
    return out, n


def attended_lengths(prompt_len: int, cache_len: int) -> list[int]:
    """Where the cache's chunks end, which are the lengths the decode steps attend over as it fills:
    doubling from the first bucket past the prompt to the whole cache."""
    lengths = [bucket(prompt_len + 1)]
    while lengths[-1] < cache_len:
        lengths.append(2 * lengths[-1])
    return [min(n, cache_len) for n in lengths]


# XLA:CPU hands the matmuls of a few rows to YNNPACK fusions, which run a decode step's [batch, width]
# x [width, width'] products slower than its own kernels (baseline-tiny at batch 8: 2.50 vs 1.98 ms per
# step); training's large matmuls gain from them, so only the decode program goes without.
_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
_JITTED = {cpu: jax.jit(_decode_loop, static_argnames=("model", "cache_len"),
                        compiler_options=_CPU_OPTIONS if cpu else None) for cpu in (True, False)}


def decode_loop() -> Any:
    """The jitted `_decode_loop`, compiled with the default backend's options."""
    return _JITTED[jax.default_backend() == "cpu"]


def compiled_programs() -> int:
    """How many decode programs have been compiled so far in this process (for tests and benchmarks)."""
    return sum(f._cache_size() for f in _JITTED.values())


def generate(model: GPT, params: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None,
             seed: int = 0, vocab_size: int | None = None, mesh: Any = None,
             rules: Rules | None = None, stop_ids: Sequence[int] = ()) -> list[list[int]]:
    """New tokens for each prompt (token ids), up to `max_new_tokens` each, cut before `eos_id` or after
    the first of `stop_ids` (tokens that end a row's text, such as those holding a newline), all below
    `vocab_size` (a tokenizer smaller than the model's vocabulary; default the model's).
    With `mesh` (and its `rules`), runs under it: params may be sharded, the cache is laid out like
    the activations (batch over data/fsdp, kv heads over tensor)."""
    args, cache_len = decode_inputs(model.config, prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                                    top_p=top_p, eos_id=eos_id, seed=seed, vocab_size=vocab_size, stop_ids=stop_ids)
    with with_mesh(mesh, rules or ()) if mesh is not None else contextlib.nullcontext():
        out, n = decode_loop()(model, params, *args, cache_len=cache_len)
    eos = int(args[-2])
    out, n = np.asarray(out), int(n)
    results = []
    for row in out[:, :n].tolist():
        results.append(row[: row.index(eos)] if eos in row else row)
    return results


def decode_inputs(cfg: ModelConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None,
                  seed: int = 0, vocab_size: int | None = None,
                  stop_ids: Sequence[int] = ()) -> tuple[tuple[Any, ...], int]:
    """The decode program's arguments after the parameters (left-padded prompts, their starts, the rng,
    the sampling settings, the sampled vocabulary's size, the EOS id or -1, the mask of ids that end a
    row) and its cache length; one error naming any bad value."""
    if not prompts:
        raise ValueError("No prompt to generate from (give at least one, and num_samples >= 1).")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("Every prompt needs at least one token.")
    limit = cfg.vocab_size if vocab_size is None else min(vocab_size, cfg.vocab_size)
    if limit < 1:
        raise ValueError(f"vocab_size={vocab_size} leaves no token to sample.")
    longest = max(len(p) for p in prompts)
    if max_new_tokens < 1 or longest + max_new_tokens > cfg.block_size:
        raise ValueError(f"max_new_tokens={max_new_tokens} is not in [1, {cfg.block_size - longest}]: the longest "
                         f"prompt has {longest} tokens and the model's block_size is {cfg.block_size}.")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} is not in (0, 1]: the smallest set of tokens with that probability mass.")
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature} is not a finite number >= 0 (0 is greedy).")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} is negative (0 keeps every token).")
    # Prompts pad to a bucket, the cache to a bucket of that plus the new tokens; near block_size the
    # prompt bucket shrinks so that the new tokens still fit (>= longest, checked above).
    width = min(width_bucket(longest), cfg.block_size - max_new_tokens)
    cache_len = min(cfg.block_size, bucket(width + max_new_tokens))
    prompt = np.zeros((len(prompts), width), np.int32)
    for row, p in enumerate(prompts):
        prompt[row, width - len(p):] = p
    start = np.array([width - len(p) for p in prompts], np.int32)
    stops = np.zeros(cfg.padded_vocab_size, bool)
    stops[[i for i in (*stop_ids, eos_id) if i is not None and 0 <= i < cfg.padded_vocab_size]] = True
    args = (prompt, start, jax.random.PRNGKey(seed), np.int32(max_new_tokens), np.float32(temperature),
            np.int32(top_k), np.float32(top_p), np.int32(limit), np.int32(-1 if eos_id is None else eos_id), stops)
    return args, cache_len


def generate_text(model: GPT, params: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int,
                  stop: Sequence[str] = (), **kwargs: Any) -> list[str]:
    """Completions of text prompts: encoded with `tokenizer`, generated (stopping at its EOS), decoded
    and cut before the first of the `stop` strings."""
    ids = [tokenizer.encode(p).tolist() for p in prompts]
    kwargs.setdefault("eos_id", tokenizer.eos_id)
    kwargs.setdefault("vocab_size", tokenizer.vocab_size)
    return [cut_at_stop(tokenizer.decode(t), stop) for t in generate(model, params, ids, max_new_tokens, **kwargs)]


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any of the stop strings."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]
