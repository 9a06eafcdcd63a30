"""The KV cache that decoding passes through the model (see lightjax/model/generate.py): every layer's keys
and values so far, written in place, read only as far as they are filled.

Slots [0, index) are filled. Row b's real tokens start at slot start[b] (prompts are left-padded to a
common length), so its RoPE position is slot - start[b] and its queries never see the padding. A cache
whose `index` is a vector [B] fills each row to its own slot (serving: each row a request of its own
length, see lightjax/serve/engine.py).

The slots are split into chunks, each its own buffer of shape [b, g, s, h] (heads-major, as the
attention reads them): one per layer for a loop of layers, one [L, b, g, s, h] for a scanned stack.
While the cache holds fewer tokens than the end of chunk j, the decode step writes into chunk j and
attends over chunks 0..j only (`length` is chunk j's end), so that a step reads about as much of the
cache as is filled. Separate buffers are what make that cheap: slicing the filled part out of one
buffer would copy it (and XLA would then copy the whole buffer to write into it).

Each block gets the whole cache with `layer` set to its own, writes its new keys and values in place
and attends over its layer: a step touches only its new slots and what it reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from lightjax.model.config import ModelConfig
from lightjax.model.layers import Array, Dtype, causal_mask, constrain

AXES = ("layers", "batch", "act_heads", None, "act_kv")  # kv heads over tensor, like the qkv kernel

Chunk = Array | tuple[Array, ...]  # a chunk of every layer: stacked [L, b, g, s, h], or one array per layer


class KVCache(flax.struct.PyTreeNode):
    k: tuple[Chunk, ...]  # one entry per chunk of slots
    v: tuple[Chunk, ...]
    index: Array  # int32: the next free slot, a scalar (every row the same) or [B] (each row its own)
    start: Array  # int32 [B]
    layer: int | Array = 0  # the layer a block writes and reads: an int, or a traced one in a scanned stack
    length: int | None = flax.struct.field(pytree_node=False, default=None)  # a chunk's end; None: all

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, ends: int | Sequence[int], dtype: Dtype,
              start: Array | None = None, stacked: bool = False) -> KVCache:
        """An empty cache whose chunks end at `ends` (one int: a single chunk of that many slots);
        `stacked` for a scanned layer stack."""
        ends = [ends] if isinstance(ends, int) else list(ends)
        sizes = np.diff([0, *ends])
        if len(ends) == 0 or min(sizes) < 1:
            raise ValueError(f"KVCache chunk ends {ends} are not increasing from 1.")

        def chunk(size: int) -> Chunk:
            shape = (batch, cfg.n_query_groups, int(size), cfg.head_size)
            if stacked:
                return jnp.zeros((cfg.n_layer, *shape), dtype)
            return tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layer))

        start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
        return cls(tuple(map(chunk, sizes)), tuple(map(chunk, sizes)), jnp.zeros((), jnp.int32), start)

    @property
    def stacked(self) -> bool:
        return not isinstance(self.k[0], tuple)

    @property
    def ends(self) -> list[int]:
        """Where each chunk's slots end."""
        return [int(e) for e in np.cumsum([c.shape[-2] if self.stacked else c[0].shape[-2] for c in self.k])]

    @property
    def slots(self) -> int:
        """How many slots the queries attend over: those of the chunks up to `length`."""
        return self.ends[-1] if self.length is None else self.length

    def _current(self) -> int:
        """The chunk that this call writes into: the last one attended over."""
        if self.slots not in self.ends:
            raise ValueError(f"KVCache.length={self.length} is not a chunk's end (the chunks end at {self.ends}).")
        return self.ends.index(self.slots)

    def write(self, k: Array, v: Array) -> KVCache:
        """The cache with this call's keys and values [b, t, g, h] written into the layer's slots
        index.. (all in the current chunk)."""
        j = self._current()
        offset = self.index - (self.ends[j - 1] if j else 0)

        def written(chunks: tuple[Chunk, ...], new: Array) -> tuple[Chunk, ...]:
            chunk = chunks[j]
            new = new.transpose(0, 2, 1, 3)
            if self.stacked and jnp.ndim(offset) == 0:
                at = (self.layer, 0, 0, offset, 0)
                chunk = constrain(jax.lax.dynamic_update_slice(chunk, new[None].astype(chunk.dtype), at), AXES)
            elif self.stacked:
                layer = _put_rows(jax.lax.dynamic_index_in_dim(chunk, self.layer, keepdims=False), new, offset)
                chunk = constrain(jax.lax.dynamic_update_slice(chunk, layer[None], (self.layer, 0, 0, 0, 0)), AXES)
            else:
                layer = _put_rows(chunk[self.layer], new, offset)
                chunk = (*chunk[: self.layer], constrain(layer, AXES[1:]), *chunk[self.layer + 1:])
            return (*chunks[:j], chunk, *chunks[j + 1:])

        return self.replace(k=written(self.k, k), v=written(self.v, v))

    def read(self) -> tuple[list[Array], list[Array]]:
        """The layer's keys and values of the attended chunks, each [b, g, s, h]."""
        n = self._current() + 1
        if self.stacked:
            pick = lambda c: jax.lax.dynamic_index_in_dim(c, self.layer, keepdims=False)  # noqa: E731
        else:
            pick = lambda c: c[self.layer]  # noqa: E731
        return [pick(c) for c in self.k[:n]], [pick(c) for c in self.v[:n]]

    def mask(self, T: int, window: int | None = None) -> Array:
        """[B, 1, T, S] over the attended slots: the query in slot index+t sees keys from start[b] up
        to its own slot (the last `window` of them, with a window). A padding query sees only itself,
        so that its (unused) output stays finite."""
        if jnp.ndim(self.index) == 0:  # every row at the same slot (generation)
            q_slot = self.index + jnp.arange(T)
            k_slot = jnp.arange(self.slots)[None, :]  # [1, S]
            real = (k_slot[None] >= self.start[:, None, None]) | (k_slot == q_slot[:, None])[None]
            return causal_mask(q_slot, self.slots, window)[0] & real[:, None]
        q_slot = self.index[:, None, None] + jnp.arange(T)[:, None]  # [B, T, 1]: each row at its own slot
        k_slot = jnp.arange(self.slots)  # [S]
        seen = k_slot <= q_slot
        if window is not None:
            seen &= k_slot > q_slot - window
        real = (k_slot >= self.start[:, None, None]) | (k_slot == q_slot)
        return (seen & real)[:, None]


def _put_rows(buffer: Array, new: Array, offset: Array) -> Array:
    """buffer [b, g, s, h] with new [b, g, t, h] written at slot `offset`: one for every row (a scalar) or
    each row's own ([b])."""
    new = new.astype(buffer.dtype)
    if jnp.ndim(offset) == 0:
        return jax.lax.dynamic_update_slice(buffer, new, (0, 0, offset, 0))
    return jax.vmap(lambda b, n, o: jax.lax.dynamic_update_slice(b, n, (0, o, 0)))(buffer, new, offset)
