"""Reading a compiled XLA program's text: its computations, loops, matmuls and collectives.

XLA's own cost analysis counts the body of a while loop once, however many times it runs; a scanned
layer stack (`train.scan_layers`) is such a loop, so its FLOPs come out about 1/n_layer of the truth.
`loop_corrected_flops` adds the missing iterations of every matmul (a `dot`, or on TPUs a
`convolution`) inside loops whose trip count is known (XLA's `known_trip_count`, or the `i < N` of
the loop's condition). Element-wise work inside loops stays counted once: matmuls are nearly all of a
transformer's FLOPs.
"""

from __future__ import annotations

import glob
import math
import re
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\(.*?\)|\S+) ([\w-]+)\((.*)$")  # shape: array or tuple
_ARRAY = re.compile(r"^\w+\[([\d,]*)\]")
_CALL = re.compile(r"\b(?:calls|to_apply|body)=%([\w.\-]+)")
_CALL_LIST = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_OP_NAME = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?metadata=\{[^}]*op_name=\"([^\"]*)\"", re.M)
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def computations(text: str) -> tuple[dict[str, list[str]], str]:
    """({computation name: its instruction lines}, the entry computation's name)."""
    comps: dict[str, list[str]] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif line.rstrip() == "}":  # not "}}, metadata=...": a custom call's attributes can span lines
            current = None
        elif current is not None:
            comps[current].append(line)
    return comps, entry


def _dims(shape: str) -> list[int] | None:
    m = _ARRAY.match(shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else None


def _dot_flops(result: list[int], lhs: list[int], rest: str) -> float:
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
    k = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i) if contracting else 1
    return 2.0 * math.prod(result) * k


def _valid_taps(size: int, window: int, pad_low: int, stride: int, out: int, dilate: int = 1) -> int:
    """(output position, kernel position) pairs of one spatial dimension that read real input, not padding
    nor the holes of an input dilated by `dilate`."""
    return sum(1 for o in range(out) for j in range(window)
               if 0 <= (x := o * stride + j - pad_low) <= (size - 1) * dilate and x % dilate == 0)


def _conv_flops(result: list[int], lhs: list[int], rhs: list[int], rest: str) -> float:
    """A convolution (TPU programs express matmuls and attention so), counted as XLA counts it: one
    multiply-add per output element, input feature and kernel position that reads input, not padding."""
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", rest)
    if not labels or (len(labels.group(1)), len(labels.group(2)), len(labels.group(3))) != (
            len(lhs), len(rhs), len(result)):
        return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    window = re.search(r"window=\{([^}]*)\}", rest)
    fields = dict(f.split("=") for f in window.group(1).split()) if window else {}
    sizes = [int(x) for x in fields["size"].split("x")] if "size" in fields else []
    pads = [int(p.split("_")[0]) for p in fields["pad"].split("x")] if "pad" in fields else [0] * len(sizes)
    strides = [int(x) for x in fields["stride"].split("x")] if "stride" in fields else [1] * len(sizes)
    # TPU programs write attention's batched matmuls as convolutions over a dilated input ("base dilated")
    dilations = [int(x) for x in fields["lhs_dilate"].split("x")] if "lhs_dilate" in fields else [1] * len(sizes)
    if "rhs_dilate" in fields:
        return 0.0  # not seen in a train step; left uncorrected rather than guessed
    macs = result[out_l.index("b")] * result[out_l.index("f")]
    macs *= rhs[rhs_l.index("i")]
    for d, (k, pad, stride, dilate) in enumerate(zip(sizes, pads, strides, dilations, strict=True)):
        label = str(d)
        macs *= _valid_taps(lhs[lhs_l.index(label)], k, pad, stride, result[out_l.index(label)], dilate)
    groups = re.search(r"feature_group_count=(\d+)", rest)
    return 2.0 * macs / (int(groups.group(1)) if groups else 1)


def _definitions(lines: list[str]) -> dict[str, tuple[str, str]]:
    """{instruction name: (op, the rest of its line)} of one computation."""
    return {m.group(1): (m.group(3), m.group(4)) for line in lines for m in [_INSTRUCTION.match(line)] if m}


def _constant(defs: dict[str, tuple[str, str]], name: str) -> int | None:
    op, rest = defs.get(name, ("", ""))
    m = re.match(r"(-?\d+)\)", rest) if op == "constant" else None
    return int(m.group(1)) if m else None


def _tuple_operand(defs: dict[str, tuple[str, str]], name: str, index: int) -> str | None:
    op, rest = defs.get(name, ("", ""))
    names = re.findall(r"%([^,\s)]+)", rest.split(")")[0]) if op == "tuple" else []
    return names[index] if index < len(names) else None


def _step(defs: dict[str, tuple[str, str]], update: str) -> int:
    """What a loop body adds to its counter: the constants along the chain of adds that computes the
    counter's next value (`i + 1 + 1` where XLA runs two windowed-einsum steps an iteration); 1 if the
    chain has another form."""
    step = 0
    op, args = defs.get(update, ("", ""))
    while op == "add":
        a, b = (re.findall(r"%([^,\s)]+)", args.split(")")[0]) + ["", ""])[:2]
        constant, other = (_constant(defs, b), a) if _constant(defs, b) is not None else (_constant(defs, a), b)
        if constant is None:
            return 1
        step += constant
        op, args = defs.get(other, ("", ""))
    return step if op == "get-tuple-element" and step > 0 else 1


def _trip_count(comps: dict[str, list[str]], rest: str, caller: list[str] | None = None) -> int:
    """A while loop's iterations: XLA's `known_trip_count` where it records one (CPU, GPU), else from
    its condition `i < N`, the step the body adds to i (the partitioner's windowed-einsum loops run two
    chunks an iteration, stepping by 2) and i's starting constant in the caller (0 if not found);
    1 when the condition is not of that form."""
    known = _TRIP.search(rest)
    if known:
        return int(known.group(1))
    condition, body = re.search(r"condition=%([\w.\-]+)", rest), re.search(r"body=%([\w.\-]+)", rest)
    cond = _definitions(comps.get(condition.group(1), []) if condition else [])
    compare = [r for op, r in cond.values() if op == "compare" and "direction=LT" in r]
    operands = re.findall(r"%([^,\s)]+)", compare[0].split(")")[0]) if len(compare) == 1 else []
    if len(operands) != 2 or _constant(cond, operands[1]) is None:
        return 1
    bound = _constant(cond, operands[1])
    index = re.search(r"index=(\d+)", cond.get(operands[0], ("", ""))[1])
    if not index:  # a counter in another form: counted from 0 by 1
        return bound
    k = int(index.group(1))
    lines = comps.get(body.group(1), []) if body else []
    defs = _definitions(lines)
    root = next((m.group(1) for line in lines if line.lstrip().startswith("ROOT")
                 for m in [_INSTRUCTION.match(line)] if m), "")
    step = _step(defs, _tuple_operand(defs, root, k) or "")
    init = 0
    if caller is not None:
        start = re.match(r"\s*%([^,\s)]+)", rest)
        first = _tuple_operand(_definitions(caller), start.group(1), k) if start else None
        init = _constant(_definitions(caller), first or "") or 0
    return max(0, -(-(bound - init) // step))


def _executions(comps: dict[str, list[str]], entry: str) -> Iterator[tuple[str, int]]:
    """(computation, how many times one run of `entry` runs it) for every computation it reaches:
    a while loop's body runs its trip count times as often as the loop. Each pair is given once (a
    computation called from places with different counts is given once per count)."""
    pending, seen = [(entry, 1)], set()
    while pending:
        name, times = pending.pop()
        if (name, times) in seen or name not in comps:
            continue
        seen.add((name, times))
        yield name, times
        for line in comps[name]:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            op, rest = m.group(3), m.group(4)
            trip = _trip_count(comps, rest, comps[name]) if op == "while" else 1
            for callee in _CALL.findall(rest) + [c.strip().lstrip("%") for g in _CALL_LIST.findall(rest)
                                                 for c in g.split(",")]:
                body = re.search(rf"body=%{re.escape(callee)}(?=[,\s]|$)", rest)
                pending.append((callee, times * trip if body else times))


def _matmul_flops(lines: list[str]) -> float:
    """FLOPs of the dots and convolutions of one computation's instructions."""
    shapes: dict[str, list[int] | None] = {}
    total = 0.0
    for line in lines:
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        inst, shape, op, rest = m.groups()
        shapes[inst] = _dims(shape)
        if op in ("dot", "convolution"):
            operands = re.findall(r"%([^,\s)]+)", rest.split(")")[0])
            lhs, rhs, result = shapes.get(operands[0]), shapes.get(operands[-1]), shapes[inst]
            if lhs is not None and rhs is not None and result is not None:
                total += _dot_flops(result, lhs, rest) if op == "dot" else _conv_flops(result, lhs, rhs, rest)
    return total


def op_names(text: str) -> dict[str, str]:
    """{instruction: its `op_name` metadata, the JAX source scope it came from} over a whole program."""
    return {m.group(1): m.group(2) for m in _OP_NAME.finditer(text)}


def loop_corrected_flops(text: str, xla_flops: float) -> float:
    """`xla_flops` (cost analysis of the program in `text`) plus the loop iterations it left out."""
    comps, entry = computations(text)
    return xla_flops + sum((times - 1) * _matmul_flops(comps[name])
                           for name, times in _executions(comps, entry) if times > 1)


def compiled_flops(compiled: Any) -> float | None:
    """FLOPs of one call of a compiled function (one device's share), from XLA's cost analysis with the
    matmuls of loop bodies counted once per iteration (loop_corrected_flops; XLA counts a scanned
    layer stack once). None if the backend has no cost analysis."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 (some backends do not implement it)
        return None
    if isinstance(analysis, list):
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return loop_corrected_flops(compiled.as_text(), float(flops)) if flops else None


def loop_copies(text: str, min_elements: int) -> list[tuple[str, str, str]]:
    """(instruction, op, shape) of each array of at least `min_elements` elements that the body of a
    while loop (or a loop, branch or call inside one) makes anew each iteration: copies, slices,
    transposes, fusions. Updates in place are left out: a dynamic-update-slice, alone or inside a
    fusion of its size. A decode loop that writes its cache in place lists none of the cache's size."""
    comps, _ = computations(text)
    pending = [b for lines in comps.values() for line in lines for b in re.findall(r"body=%([\w.\-]+)", line)]
    bodies: set[str] = set()
    while pending:
        name = pending.pop()
        if name in bodies or name not in comps:
            continue
        bodies.add(name)
        for line in comps[name]:
            m = _INSTRUCTION.match(line)
            if m and m.group(3) in ("while", "conditional", "call"):
                pending += _CALL.findall(m.group(4)) + [c.strip().lstrip("%") for g in _CALL_LIST.findall(m.group(4))
                                                        for c in g.split(",")]
    found = []
    for name in sorted(bodies):
        for line in comps[name]:
            m = _INSTRUCTION.match(line)
            if not m or m.group(3) in _NOT_WRITES:
                continue
            inst, shape, op, rest = m.groups()
            dims = _dims(shape)
            if dims is None or math.prod(dims) < min_elements or _in_place(comps, op, rest, math.prod(dims)):
                continue
            found.append((inst, op, shape))
    return found


_NOT_WRITES = ("parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "conditional", "call")


def _in_place(comps: dict[str, list[str]], op: str, rest: str, elements: int) -> bool:
    if op == "dynamic-update-slice":
        return True
    callee = _CALL.search(rest) if op == "fusion" else None
    for line in comps.get(callee.group(1), []) if callee else []:
        m = _INSTRUCTION.match(line)
        dims = _dims(m.group(2)) if m and m.group(3) == "dynamic-update-slice" else None
        if dims is not None and math.prod(dims) == elements:
            return True
    return False


# ------------------------------------------------------------------------------------------------
# Collectives of a partitioned program: what each step sends between devices.
# ------------------------------------------------------------------------------------------------

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8}
_ARRAYS = re.compile(r"(\w+)\[([\d,]*)\]")
# Ops that only rearrange their operand: an all-reduce reaching dynamic-slices through them is a reduce-scatter.
_REARRANGE = ("reshape", "bitcast", "copy", "transpose")


def _nbytes(shape: str) -> int:
    """Bytes of an array or tuple shape."""
    return sum(_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _ARRAYS.findall(shape) if dtype in _BYTES)


def _scattered(name: str, users: dict[str, list[tuple[str, str]]]) -> bool:
    """Whether every use of `name`, through reshapes and copies, is a dynamic-slice: XLA's form of a
    reduce-scatter right after partitioning (an all-reduce each device keeps only its slice of)."""
    pending, seen = [name], set()
    while pending:
        for user, op in users.get(pending.pop(), []):
            if op in _REARRANGE and user not in seen:
                seen.add(user)
                pending.append(user)
            elif op != "dynamic-slice":
                return False
    return bool(seen) or bool(users.get(name))


def _groups(rest: str) -> np.ndarray | None:
    """The device groups of a collective, [groups, devices per group] of partition ids, in any of XLA's
    spellings (mesh axes with device ids, iota, explicit lists, a permute's pairs); None if unreadable."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))? \{([^}]*)\}",
                  rest)
    if m:
        axes = [(name, int(size)) for name, size in re.findall(r"'(\w+)'=(\d+)", m.group(1))]
        ids = np.arange(math.prod(size for _, size in axes))
        if m.group(2):
            ids = ids.reshape([int(d) for d in m.group(2).split(",")])
            ids = ids.transpose([int(d) for d in m.group(3).split(",")]) if m.group(3) else ids
        ids = ids.reshape([size for _, size in axes])
        grouped = [i for i, (name, _) in enumerate(axes) if f"'{name}'" in m.group(4)]
        moved = np.moveaxis(ids, grouped, list(range(ids.ndim - len(grouped), ids.ndim)))
        return moved.reshape(-1, math.prod(axes[i][1] for i in grouped))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", rest)
    if m:
        ids = np.arange(int(m.group(1)) * int(m.group(2))).reshape([int(d) for d in m.group(3).split(",")])
        ids = ids.transpose([int(d) for d in m.group(4).split(",")]) if m.group(4) else ids
        return ids.reshape(int(m.group(1)), int(m.group(2)))
    m = re.search(r"(?:replica_groups|source_target_pairs)=\{((?:\{[\d,]*\},?)*)\}", rest)
    if m:
        groups = [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
        width = max((len(g) for g in groups), default=0)
        return np.array([g + g[-1:] * (width - len(g)) for g in groups if g]) if width else None
    return None


def collectives(text: str, slice_of: Sequence[int] | None = None) -> dict[str, dict[str, float]]:
    """{kind: {"count", "bytes", "dcn_bytes"}} of one run of a partitioned program (the module right after
    SPMD partitioning: `partitioned_text`), loop bodies multiplied by their trip counts. Bytes are those of
    the whole tensor each collective combines on one device: an all-gather's result, a reduce-scatter's
    operand, an all-reduce's result. With `slice_of` (the slice of each partition id, multi-slice), the
    bytes of collectives whose groups span slices are also counted as `dcn_bytes`: they cross the
    data-center network."""
    comps, entry = computations(text)
    totals = {kind: {"count": 0.0, "bytes": 0.0, "dcn_bytes": 0.0} for kind in COLLECTIVES}
    for name, times in _executions(comps, entry):
        parsed = [m.groups() for line in comps[name] for m in [_INSTRUCTION.match(line)] if m]
        shapes = {inst: shape for inst, shape, _, _ in parsed}
        users: dict[str, list[tuple[str, str]]] = {}
        for inst, _, op, rest in parsed:
            for operand in re.findall(r"%([^,\s)]+)", rest.split("), ")[0]):
                users.setdefault(operand, []).append((inst, op))
        for inst, shape, op, rest in parsed:
            kind = op.removesuffix("-start")
            if kind not in COLLECTIVES:
                continue
            nbytes = _nbytes(shape)
            if kind == "reduce-scatter":
                operand = re.match(r"\s*%([^,\s)]+)", rest)
                nbytes = _nbytes(shapes.get(operand.group(1), "")) if operand else nbytes
            elif kind == "all-reduce" and _scattered(inst, users):
                kind = "reduce-scatter"
            totals[kind]["count"] += times
            totals[kind]["bytes"] += times * nbytes
            if slice_of is not None and _crosses_slices(rest, slice_of):
                totals[kind]["dcn_bytes"] += times * nbytes
    return totals


def _crosses_slices(rest: str, slice_of: Sequence[int]) -> bool:
    """Whether a collective's device groups span slices (a group it cannot read is taken to)."""
    groups = _groups(rest)
    if groups is None:
        return True
    slices = np.asarray(slice_of)[groups]
    return bool((slices != slices[:, :1]).any())


def partitioned_text(lowered: Any) -> tuple[Any, str]:
    """(the compiled program, its module right after SPMD partitioning, as text): there each collective
    appears once, before later passes fuse, combine and wrap them in asynchronous pairs."""
    with tempfile.TemporaryDirectory() as tmp:
        compiled = lowered.compile(compiler_options={"xla_dump_to": tmp,
                                                     "xla_dump_hlo_pass_re": ".*spmd-partitioning"})
        dumps = sorted(p for p in glob.glob(f"{tmp}/*.txt") if re.search(r"\.after_(tpu-)?spmd-partitioning\.", p))
        if not dumps:
            text = compiled.as_text()
            if "num_partitions=" not in text.split("\n", 1)[0]:  # one device: nothing to partition
                return compiled, text
            raise RuntimeError("XLA wrote no module after SPMD partitioning; cannot count collectives.")
        with open(dumps[0]) as f:
            return compiled, f.read()
