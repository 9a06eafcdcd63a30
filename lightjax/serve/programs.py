"""The compiled programs of serving with continuous batching (engine.py runs them).

The cache has a fixed number of rows, the slots, each a request's keys and values from slot 0 on, filled to
its own `index` (kv_cache.py's per-row index). Two programs touch it:

- `admit`: one request's prompt, right-padded to a bucketed width, through the model on a cache of its
  own (prefill), its first token sampled, then its keys and values copied into a free row, whose index
  becomes the prompt's length. What the row held before is never seen: a query sees only slots below its
  own, and those the new request has written.
- `step`: one token for every row (decode): each row's last token goes through the model at its own slot,
  every active row's next token is sampled with its own settings and key, and only active rows advance.

One `admit` is compiled per prompt width bucket and one `step` in all, at warm-up; serving compiles nothing.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lightjax.model.generate import bucket, sample
from lightjax.model.gpt import GPT, KVCache
from lightjax.model.kv_cache import AXES
from lightjax.runtime.sharding import Rules


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Per-row sampling settings, arrays [rows]: temperature (0: greedy), top_k (0: all), top_p, and each
    row's random key and token count (the key of its i-th token is fold_in(key, i))."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    key: jax.Array  # [rows, 2] uint32
    count: jax.Array


jax.tree_util.register_dataclass(Sampling, data_fields=["temperature", "top_k", "top_p", "key", "count"],
                                 meta_fields=[])


def sample_rows(logits: jax.Array, s: Sampling, vocab_limit: jax.Array) -> jax.Array:
    """Next tokens [rows] from logits [rows, V]: each row sampled as generate.sample samples a batch, with the
    row's own settings and key (greedy at temperature 0). Ids from `vocab_limit` on are never drawn. The
    filters' sorts run only when some row samples."""
    logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits.astype(jnp.float32), -jnp.inf)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def one(row: jax.Array, key: jax.Array, count: jax.Array, t: jax.Array, k: jax.Array, p: jax.Array) -> jax.Array:
        return sample(row[None], jax.random.fold_in(key, count), t, k, p)[0]

    def drawn(_: Any) -> jax.Array:
        return jax.vmap(one)(logits, s.key, s.count, s.temperature, s.top_k, s.top_p)

    return jax.lax.cond(jnp.any(s.temperature > 0), drawn, lambda _: greedy, None)


def empty_cache(model: GPT, rows: int, length: int) -> KVCache:
    """The serving cache: `rows` slots of `length` tokens each, every row empty (index 0)."""
    cache = KVCache.empty(model.config, rows, length, model.dtype, stacked=model.scan_layers)
    return cache.replace(index=jnp.zeros((rows,), jnp.int32))


def _admit(model: GPT, params: Any, cache: KVCache, prompt: jax.Array, length: jax.Array, row: jax.Array,
           sampling: Sampling, vocab_limit: jax.Array) -> tuple[KVCache, jax.Array]:
    """(the cache with the prompt [1, W] (its first `length` tokens real) in `row`, its first new token)."""
    width = prompt.shape[1]
    own = KVCache.empty(model.config, 1, width, model.dtype, stacked=model.scan_layers)
    logits, own = model.apply({"params": params}, prompt, own, method="decode")
    last = jax.lax.dynamic_index_in_dim(logits[0], length - 1, keepdims=True)  # [1, V]
    token = sample_rows(last, sampling, vocab_limit)[0]

    def copy(slots: Any, new: Any) -> Any:  # a row's first `width` slots; later ones stay unseen
        at = (0, row, 0, 0, 0) if model.scan_layers else (row, 0, 0, 0)
        return jax.lax.dynamic_update_slice(slots, new.astype(slots.dtype), at)

    k = jax.tree.map(copy, cache.k, own.k)
    v = jax.tree.map(copy, cache.v, own.v)
    return cache.replace(k=k, v=v, index=cache.index.at[row].set(length)), token


def _step(model: GPT, params: Any, cache: KVCache, tokens: jax.Array, active: jax.Array, sampling: Sampling,
          vocab_limit: jax.Array) -> tuple[KVCache, jax.Array]:
    """(the cache one token further in every active row, each row's next token [rows])."""
    index = cache.index
    logits, cache = model.apply({"params": params}, tokens[:, None], cache, method="decode")
    last = jnp.minimum(cache.index, cache.ends[-1] - 1)  # a full row stays put (the engine never lets one fill)
    return cache.replace(index=jnp.where(active, last, index)), sample_rows(logits[:, -1], sampling, vocab_limit)


def programs(model: GPT, cache_sharding: KVCache | None = None, mesh: Mesh | None = None) -> tuple[Any, Any]:
    """(admit, step), jitted for `model` with the cache donated; on a `mesh` with the cache's layout fixed
    (`cache_shardings`), so that every call sees the cache it compiled for."""
    out = {} if mesh is None else {"out_shardings": (cache_sharding, NamedSharding(mesh, PartitionSpec()))}
    admit = jax.jit(functools.partial(_admit, model), donate_argnums=(1,), **out)
    step = jax.jit(functools.partial(_step, model), donate_argnums=(1,), **out)
    return admit, step


def cache_shardings(cache: KVCache, mesh: Mesh, rules: Rules) -> KVCache:
    """The serving cache's layout on `mesh`: its keys and values as the model lays them out (slots over
    data, kv heads over tensor), the rest replicated."""
    chunk = nn.logical_to_mesh_sharding(PartitionSpec(*(AXES if cache.stacked else AXES[1:])), mesh, rules)
    whole = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), cache)
    return whole.replace(k=jax.tree.map(lambda _: chunk, cache.k), v=jax.tree.map(lambda _: chunk, cache.v))


def prompt_buckets(max_prompt: int, minimum: int = 16) -> list[int]:
    """The padded prompt widths `admit` is compiled for: powers of two from `minimum` up to the one
    holding `max_prompt` (the last cut to `max_prompt` when that is smaller)."""
    widths = [bucket(1, minimum)]
    while widths[-1] < max_prompt:
        widths.append(2 * widths[-1])
    return [min(w, max_prompt) for w in widths]
