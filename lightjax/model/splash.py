"""Splash attention: the TPU Pallas kernel that ships with JAX (`jax.experimental.pallas.ops.tpu.splash_attention`),
as MaxText and Levanter run it. It computes softmax(q k^T) v block by block and never holds a layer's
[heads, T, T] scores, so long sequences stop filling HBM; it takes the causal and sliding-window masks,
Gemma 2's logit soft-cap, grouped queries and segment ids (document masks).

The kernel works on one sequence, heads first: [heads, T, head_dim]; it is vmapped over the batch and,
under a mesh, run per device with `shard_map`: batch over the mesh axes the logical `batch` maps to
(data, fsdp), heads over those of `act_heads` (tensor), as the rest of the step lays them out.
`interpret=True` runs it on a CPU, slowly (the tests).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec

from lightjax.model.layers import Array

BLOCK = 512  # the kernel's tile along the sequence: q and kv blocks of min(BLOCK, T) tokens


def block_size(seq_len: int) -> int:
    """The q/kv block of a sequence length: up to 512 tokens, which divides it (TPU tiles are 128 wide)."""
    return min(BLOCK, seq_len)


def splash_problem(seq_len: int | None) -> str:
    """Why the kernel cannot take sequences of `seq_len` tokens ('' when it can)."""
    if seq_len is not None and (seq_len % 128 or seq_len % block_size(seq_len)):
        return f"the sequence length {seq_len} is not a multiple of 128 (its block)"
    return ""


def splash_attention(q: Array, k: Array, v: Array, scale: float, window: int | None = None,
                     softcap: float | None = None, segment_ids: Array | None = None,
                     interpret: bool = False) -> Array:
    """Causal attention of q [b, t, n, h] over k, v [b, t, g, h] (g divides n), the last `window` keys only
    when given, scores soft-capped at `softcap`, inside each segment of `segment_ids` [b, t]; -> [b, t, n, h]."""
    run = functools.partial(_splash, scale=scale, window=window, softcap=softcap, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return run(q, k, v, segment_ids)
    batch, heads = nn.logical_to_mesh_axes(("batch", "act_heads"))
    spec = PartitionSpec(batch, None, heads, None)
    segments = None if segment_ids is None else PartitionSpec(batch, None)
    return jax.shard_map(run, in_specs=(spec, spec, spec, segments), out_specs=spec, check_vma=False)(
        q, k, v, segment_ids)


def _splash(q: Array, k: Array, v: Array, segment_ids: Array | None, *, scale: float, window: int | None,
            softcap: float | None, interpret: bool) -> Array:
    """One device's share: the kernel for its heads, vmapped over its rows."""
    _, T, N, _ = q.shape
    mask = masks.CausalMask((T, T)) if window is None else masks.LocalMask((T, T), (window - 1, 0), 0)
    b = block_size(T)
    sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                              block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    kernel = splash.make_splash_mha(masks.MultiHeadMask([mask] * N), head_shards=1, q_seq_shards=1,
                                    block_sizes=sizes, attn_logits_soft_cap=softcap, interpret=interpret)

    def one(q: Array, k: Array, v: Array, segments: Array | None) -> Array:
        ids = None if segments is None else splash.SegmentIds(q=segments, kv=segments)
        return kernel(q, k, v, segment_ids=ids)

    heads_first = (0, 2, 1, 3)
    out = jax.vmap(one)((q * scale).transpose(heads_first), k.transpose(heads_first), v.transpose(heads_first),
                        segment_ids)
    return out.transpose(heads_first)
