"""How arrays are laid out over the devices: the mesh, the logical-axis rules, and placement.

The model names the axes of every parameter and activation with logical names (`embed`, `heads`,
`batch`, ...). This module is the only place that maps them onto the mesh axes `data`, `fsdp` and
`tensor`:

- data:   plain data parallelism; parameters replicated, the batch split.
- fsdp:   fully sharded data parallelism (ZeRO-3); the batch split *and* every parameter's `embed`
          axis split, gathered on use inside the jitted step.
- tensor: Megatron-style tensor parallelism; attention heads, MLP hidden units and the vocabulary
          split, activations reduced after each block's output projections. In a mixture of
          experts the experts are split over it instead (expert parallelism).

A sharding experiment changes the mesh shape (`--config.mesh.fsdp=8`) or the rules
(`--config.mesh.rules=...`), never the model code.
"""

from __future__ import annotations

import ast
import contextlib
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Activation axes have their own names (act_*): `embed -> fsdp` for parameters must not also shard
# the activations' feature axis while their batch axis already uses fsdp.
_ACTIVATIONS: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_expert", "tensor"),
    ("act_expert_mlp", None),
)

RULE_SETS: dict[str, Rules] = {
    # FSDP over `embed`, tensor parallelism over heads / MLP / vocabulary; the layer axis of a
    # scanned stack stays whole.
    "default": _ACTIVATIONS + (
        ("vocab", "tensor"), ("embed", "fsdp"), ("heads", "tensor"), ("kv", None), ("mlp", "tensor"),
        ("norm", None), ("layers", None), ("expert", "tensor"), ("expert_mlp", None),
    ),
    # Parameters replicated everywhere (pure data parallelism even on an fsdp axis): the baseline
    # that the memory savings of "default" are measured against.
    "replicated": _ACTIVATIONS + (
        ("vocab", None), ("embed", None), ("heads", None), ("kv", None), ("mlp", None),
        ("norm", None), ("layers", None), ("expert", None), ("expert_mlp", None),
    ),
}


def resolve_rules(rules: str | Sequence[Sequence[Any]]) -> Rules:
    """A rule-set name from RULE_SETS, or explicit (logical axis, mesh axis or axes or None) pairs,
    given as a sequence or as its Python literal (the form a command-line override takes):
    --config.mesh.rules="(('batch', 'data'), ('embed', 'fsdp'), ('mlp', 'tensor'))"."""
    if isinstance(rules, str) and rules.lstrip().startswith(("(", "[")):
        try:
            rules = ast.literal_eval(rules)
        except (ValueError, SyntaxError):
            raise ValueError(f"config.mesh.rules={rules!r} is not a valid tuple of (logical axis, mesh axes) "
                             "pairs.") from None
    if isinstance(rules, str):
        if rules not in RULE_SETS:
            raise ValueError(f"config.mesh.rules={rules!r} is not one of {', '.join(map(repr, RULE_SETS))} "
                             "(or give a tuple of (logical axis, mesh axes) pairs).")
        return RULE_SETS[rules]
    out = []
    for rule in rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"config.mesh.rules entry {rule!r} is not a (logical axis, mesh axes) pair.")
        target = rule[1]
        names = (target,) if isinstance(target, str) else tuple(target or ())
        if any(n not in MESH_AXES for n in names):
            raise ValueError(f"config.mesh.rules entry {tuple(rule)!r} names a mesh axis not in {MESH_AXES}.")
        out.append((rule[0], target if isinstance(target, str) or target is None else tuple(target)))
    return tuple(out)


def mesh_shape(mesh_cfg: Mapping[str, int], device_count: int | None = None) -> dict[str, int]:
    """Axis sizes with at most one -1 resolved so that their product is the device count."""
    n = jax.device_count() if device_count is None else device_count
    sizes = {axis: int(mesh_cfg[axis]) for axis in MESH_AXES}
    described = ", ".join(f"{a}={s}" for a, s in sizes.items())
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"config.mesh ({described}) needs positive sizes, with at most one -1.")
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    if free:
        if n % fixed:
            raise ValueError(f"config.mesh ({described}): {n} devices (jax.device_count()) are not divisible "
                             f"by the fixed axes' product {fixed}.")
        sizes[free[0]] = n // fixed
    elif fixed != n:
        raise ValueError(f"config.mesh ({described}) has {fixed} positions but jax.device_count() is {n}.")
    return sizes


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over all devices (or `devices`), with Auto axis types.

    Auto, not JAX's new default Explicit: Flax linen's logical partitioning breaks under Explicit axes.
    Devices of several slices (a multi-slice job, or a multi-slice topology to compile for) make a hybrid
    mesh whose data axis spans the slices, outermost: only data parallelism's gradient reduction crosses
    the data-center network.
    `jax.make_mesh` orders the devices for the physical topology (TPU ICI rings, NVLink islands). It
    refuses a mesh axis that is not a product of whole physical axes (8 on a 4x4 v6e slice) except on
    v5e; such a layout is still valid, with one axis spanning parts of two rings, so it is built with
    the physical axes split rather than refused (inside each slice of a multi-slice mesh too).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:  # multi-slice: the data axis spans the slices, over the data-center network
        if shape[0] % slices:
            raise ValueError(f"config.mesh.data={shape[0]} must be a multiple of the {slices} slices the devices "
                             "come in: the data axis is the one that spans them (over the data-center network).")
        grid = mesh_utils.create_hybrid_device_mesh((shape[0] // slices, *shape[1:]), (slices, 1, 1), devices,
                                                    allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except (ValueError, NotImplementedError) as e:
        if "physical mesh" not in str(e):
            raise
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def logical_to_sharding(boxed_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree of (abstract) arrays boxed with logical names (nn.LogicallyPartitioned).

    Leaves without logical names are replicated. A dimension whose size is not divisible by the mesh
    axes the rules give it stays whole (e.g. a 6-wide axis on 4 devices) rather than failing.
    """

    def one(leaf: Any) -> NamedSharding:
        if not isinstance(leaf, nn.LogicallyPartitioned):
            return NamedSharding(mesh, PartitionSpec())
        spec = nn.logical_to_mesh_axes(leaf.names, rules)
        shape = leaf.value.shape
        dims = []
        for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
            names = (axes,) if isinstance(axes, str) else tuple(axes or ())
            ways = int(np.prod([mesh.shape[a] for a in names])) if names else 1
            dims.append(axes if names and size % ways == 0 else None)
        return NamedSharding(mesh, PartitionSpec(*dims))

    return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Batch arrays [B, ...]: the batch axis split over data and fsdp, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Place this process's part of a batch onto the mesh as global jax.Arrays.

    Each process passes its own rows (global batch / process count); with one process that is the
    whole batch. The rows are laid out in process order along the batch axis.
    """
    out = {}
    for key, local in batch.items():
        local = np.asarray(local)
        sharding = batch_sharding(mesh, local.ndim)
        global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out


class PlacedBatches:
    """`shard_batch` of each batch of `batches`, done `ahead` batches early on a background thread.

    On CPU a step on several devices runs inside the call that starts it, so whatever the loop does
    between steps (reading the next batch, copying it to the devices) leaves the cores idle; here that
    work overlaps the step instead. The source is read ahead, so the number of batches consumed is
    counted by the caller, not by the source's position. An error in the source reaches `next`.
    """

    def __init__(self, batches: Iterable[Mapping[str, np.ndarray]], mesh: Mesh, ahead: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(iter(batches), mesh), daemon=True,
                                        name="PlacedBatches")
        self._thread.start()

    def _fill(self, batches: Iterator[Mapping[str, np.ndarray]], mesh: Mesh) -> None:
        while not self._stop.is_set():
            try:
                item: Any = shard_batch(next(batches), mesh)
            except BaseException as e:  # noqa: BLE001 (StopIteration included: handed to the reader)
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def __iter__(self) -> PlacedBatches:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise StopIteration from None  # closed
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop reading ahead (a source stuck in a read is left to finish on its own)."""
        self._stop.set()
        self._thread.join(timeout=10.0)


@contextlib.contextmanager
def with_mesh(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Context for tracing model code: the mesh for constraints, and the rules that translate names.

    Both are needed: under only the mesh, `nn.with_logical_constraint` has no rules to apply.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
