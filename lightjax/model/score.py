"""Log-likelihoods of continuations after contexts (what evaluation harnesses ask a model), each context
computed once for all of its continuations.

A request (context, continuation) is scored as a forward pass over (context + continuation), cut from the
left to `max_length` + 1 tokens, scores it: the log-probability of each continuation token after the
tokens before it, summed, and whether each is the argmax. Requests with the same (cut) context form a
group: the context goes through the model once (a prefill into a KV cache, left-padded as in
generation), its last logits score every continuation's first token, and each continuation's other
tokens are decoded against a copy of that cache. A multiple-choice question with four endings costs its
context once instead of four times; one-token answers (MMLU's letters) cost nothing beyond it.

Batches hold up to `batch_size` continuations of whole groups, sorted by length. The context, the
continuation and the two batch sizes are padded to buckets (at most four widths per power of two), one
compiled program per combination, and the batch axes are split over the mesh's data axes. The program
returns per-token log-probabilities and argmax flags, never the logits.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lightjax.model.generate import width_bucket
from lightjax.model.gpt import GPT, KVCache
from lightjax.model.layers import Array
from lightjax.runtime.sharding import Rules, shard_batch, with_mesh


def rows_bucket(n: int, multiple: int) -> int:
    """A batch of `n` rows padded to a power of two, and to a multiple of the mesh's batch shards."""
    rows = 1 << (max(n, 1) - 1).bit_length()
    return -(-rows // multiple) * multiple


def _log_probs(logits: Array, targets: Array) -> tuple[Array, Array]:
    """(log-probability of each target, whether it is the argmax) from float32 logits [..., V]."""
    chosen = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return chosen - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == targets


def _take_rows(cache: KVCache, owner: Array) -> KVCache:
    """The cache with row i holding row owner[i]'s keys and values (one copy per continuation)."""
    axis = 1 if cache.stacked else 0
    pick = functools.partial(jax.tree.map, lambda x: jnp.take(x, owner, axis=axis))
    return cache.replace(k=pick(cache.k), v=pick(cache.v), start=cache.start[owner])


def _score(model: GPT, params: Any, context: Array, start: Array, continuation: Array, owner: Array,
           ) -> tuple[Array, Array, Array, Array]:
    """For left-padded contexts [G, C] (real tokens from start [G]) and right-padded continuations [R, N+1]
    of context owner [R]: the first token's log-probability and argmax flag [R], and those of the tokens
    after it [R, N] (N = 0: one-token continuations, no decode)."""
    G, C = context.shape
    N = continuation.shape[1] - 1
    cache = KVCache.empty(model.config, G, C + N, model.dtype, start, stacked=model.scan_layers)
    logits, cache = model.apply({"params": params}, context, cache, method="decode")
    last = jnp.take(logits[:, -1].astype(jnp.float32), owner, axis=0)  # [R, V]
    first_lp, first_greedy = _log_probs(last, continuation[:, 0])
    if N == 0:
        return first_lp, first_greedy, jnp.zeros((owner.shape[0], 0)), jnp.zeros((owner.shape[0], 0), bool)
    logits, _ = model.apply({"params": params}, continuation[:, :-1], _take_rows(cache, owner), method="decode")
    rest_lp, rest_greedy = _log_probs(logits.astype(jnp.float32), continuation[:, 1:])
    return first_lp, first_greedy, rest_lp, rest_greedy


class Scorer:
    """`Scorer(model, mesh, rules, batch_size, max_length)(params, requests)` -> [(log-probability, is greedy)] of
    each (context ids, continuation ids) request. `batch_size` continuations per program (a multiple of the
    mesh's batch shards); contexts cut from the left to `max_length`."""

    def __init__(self, model: GPT, mesh: Any, rules: Rules, batch_size: int, max_length: int):
        self.model, self.mesh, self.rules, self.max_length = model, mesh, rules, max_length
        self.shards = mesh.shape["data"] * mesh.shape["fsdp"]
        self.batch_size = -(-batch_size // self.shards) * self.shards
        # Results replicated: every process reads all of them (each holds the same requests).
        self._program = jax.jit(functools.partial(_score, model), out_shardings=NamedSharding(mesh, PartitionSpec()))
        self.contexts_computed = 0  # for benchmarks: context rows through the model (a group's once)

    def __call__(self, params: Any, requests: Sequence[tuple[Sequence[int], Sequence[int]]],
                 progress: Callable[[int], Any] | None = None) -> list[tuple[float, bool]]:
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)  # cut context -> its requests
        for i, (context, continuation) in enumerate(requests):
            if not continuation or len(continuation) > self.max_length:
                raise ValueError(f"A continuation of {len(continuation)} tokens cannot be scored within max_length="
                                 f"{self.max_length} (it needs 1 to max_length tokens).")
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            groups[tuple(whole[: len(whole) - len(continuation)])].append(i)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for batch in self._batches(groups, requests):
            for i, answer in zip((i for _, members in batch for i in members), self._run(params, batch, requests),
                                 strict=True):
                results[i] = answer
            if progress is not None:
                progress(sum(len(members) for _, members in batch))
        return results

    def _batches(self, groups: dict[tuple[int, ...], list[int]],
                 requests: Sequence[tuple[Any, Sequence[int]]]) -> list[list[tuple[tuple[int, ...], list[int]]]]:
        """Groups (split where larger than a batch), longest first, packed into batches of up to batch_size
        continuations."""
        longest = lambda item: (-len(item[0]), -max(len(requests[i][1]) for i in item[1]))  # noqa: E731
        pieces = [(ctx, members[k:k + self.batch_size]) for ctx, members in sorted(groups.items(), key=longest)
                  for k in range(0, len(members), self.batch_size)]
        batches, rows = [], self.batch_size
        for piece in pieces:
            if rows + len(piece[1]) > self.batch_size:
                batches.append([])
                rows = 0
            batches[-1].append(piece)
            rows += len(piece[1])
        return batches

    def _run(self, params: Any, batch: list[tuple[tuple[int, ...], list[int]]],
             requests: Sequence[tuple[Any, Sequence[int]]]) -> list[tuple[float, bool]]:
        conts = [list(requests[i][1]) for _, members in batch for i in members]
        C = width_bucket(max(len(ctx) for ctx, _ in batch))
        longest = max(len(c) for c in conts) - 1
        N = width_bucket(longest) if longest else 0
        G, R = rows_bucket(len(batch), self.shards), rows_bucket(len(conts), self.shards)
        context, start = np.zeros((G, C), np.int32), np.full(G, C, np.int32)  # padding groups: no real token
        continuation, owner = np.zeros((R, N + 1), np.int32), np.zeros(R, np.int32)
        row = 0
        for g, (ctx, members) in enumerate(batch):
            context[g, C - len(ctx):], start[g] = ctx, C - len(ctx)
            for i in members:
                continuation[row, :len(requests[i][1])], owner[row] = requests[i][1], g
                row += 1
        batch_arrays = {"context": context, "start": start, "continuation": continuation, "owner": owner}
        with with_mesh(self.mesh, self.rules):
            out = [np.asarray(x) for x in self._program(params, **self._place(batch_arrays))]
        self.contexts_computed += len(batch)
        first_lp, first_greedy, rest_lp, rest_greedy = out
        answers = []
        for r, cont in enumerate(conts):
            n = len(cont) - 1
            answers.append((float(first_lp[r]) + float(rest_lp[r, :n].sum(dtype=np.float64)),
                            bool(first_greedy[r] and rest_greedy[r, :n].all())))
        return answers

    def _place(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's share of each array's rows (every process holds the whole batch), on the mesh."""
        p, count = jax.process_index(), jax.process_count()
        return shard_batch({k: x[p * len(x) // count:(p + 1) * len(x) // count] for k, x in batch.items()}, self.mesh)
