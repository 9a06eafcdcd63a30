"""A weighted mixture of sources: config.data.mixture, each source prepared once into its own token
files, their training rows interleaved by weight into one stream.

    config.data.mixture = {"web": {"source": "parquet:/data/fineweb/*.parquet", "weight": 0.7},
                           "code": {"source": "text:/data/code/*.jsonl.zst", "weight": 0.3,
                                    "tokens_dir": "gs://bucket/tokens/code"}}   # any data key, per source
    config.data.mixture_schedule = "5000:web=0.5,code=0.5"                    # weights from step 5000 on

The global row stream is a function of the seed, the data and the row's index g only (g = step * B + j):

    segment     = the schedule's weights in force at step g // B
    source, k   = `interleave`(g - the segment's first row, its weights): which source holds row g and
                  how many of that source's rows the segment took before it (a deterministic interleave:
                  every batch holds each source in proportion, within a row)
    row         = source's rows in its own seeded order (a new order each epoch), at the source's position
                  at the segment's start + k

so global batch s is rows [s * B, (s + 1) * B) of the stream whatever the number of processes, each
process reads its slice, and resuming at step s needs only s, as without a mixture.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import sys
from typing import Any

import grain
import numpy as np

from lightjax.data.rows import Rows

# Weights are held as integers (the interleave is exact in them): this many parts in all.
_RESOLUTION = 1_000_000


def interleave_counts(n: int, weights: tuple[int, ...]) -> list[int]:
    """How many of the first `n` rows of the interleave come from each source. Source i takes its share
    of what the sources before it left, rounded down: each count grows by 0 or 1 with n, and they sum to n."""
    counts, total = [], sum(weights)
    for w in weights:
        rest = n * (total - w) // total if total else 0
        counts.append(n - rest)
        n, total = rest, total - w
    return counts


def interleave(k: int, weights: tuple[int, ...]) -> tuple[int, int]:
    """(the source of row k of the interleave, how many of that source's rows come before it)."""
    before, after = interleave_counts(k, weights), interleave_counts(k + 1, weights)
    source = next(i for i, (a, b) in enumerate(zip(before, after, strict=True)) if b > a)
    return source, before[source]


@dataclasses.dataclass(frozen=True)
class Mixture:
    """The sources' names, their data settings, and the weights from each schedule step on."""

    names: tuple[str, ...]
    data: tuple[Any, ...]  # each source's config.data
    schedule: tuple[tuple[int, tuple[int, ...]], ...]  # (first step, integer weights), from step 0

    def weights_at(self, step: int) -> tuple[float, ...]:
        """The weights in force at `step`, as fractions."""
        weights = [w for s, w in self.schedule if s <= step][-1]
        return tuple(w / sum(weights) for w in weights)


def _integer_weights(weights: list[float], where: str) -> tuple[int, ...]:
    if any(not np.isfinite(w) or w < 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(f"{where}: the weights {weights} must be >= 0 and not all 0.")
    return tuple(round(w / sum(weights) * _RESOLUTION) for w in weights)


def parse_mixture(data: Any) -> Mixture | None:
    """config.data's mixture (None when it has none), with each source's data settings: config.data with
    the source's keys (`source`, and any other data key) over it."""
    spec = data.get("mixture")
    if not spec:
        return None
    names = tuple(spec.keys())
    per_source = []
    for name in names:
        entry = spec[name]
        if "source" not in entry or "weight" not in entry:
            raise ValueError(f"config.data.mixture.{name} needs a 'source' and a 'weight' (has: {', '.join(entry)}).")
        source_data = copy.deepcopy(data)
        with source_data.unlocked():
            source_data.mixture, source_data.mixture_schedule = {}, ""
            for key, value in entry.items():
                if key == "weight":
                    continue
                if key not in data or key in ("mixture", "mixture_schedule"):
                    raise ValueError(f"config.data.mixture.{name}.{key} is not a data setting a source can have "
                                     "(any of config.data's keys but the mixture's own).")
                source_data[key] = value
        per_source.append(source_data)
    schedule = [(0, _integer_weights([float(spec[n]["weight"]) for n in names], "config.data.mixture"))]
    for step, weights in _parse_schedule(data.get("mixture_schedule", ""), names):
        if step <= schedule[-1][0]:
            raise ValueError(f"config.data.mixture_schedule: step {step} must come after step {schedule[-1][0]}.")
        schedule.append((step, weights))
    return Mixture(names, tuple(per_source), tuple(schedule))


def _parse_schedule(text: str, names: tuple[str, ...]) -> list[tuple[int, tuple[int, ...]]]:
    """'STEP:name=w,name=w;STEP:...' -> [(step, integer weights)]; a source not named has weight 0."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        match = re.fullmatch(r"(\d+)\s*:\s*(.+)", part)
        pairs = [p.split("=") for p in match.group(2).split(",")] if match else []
        if not match or any(len(p) != 2 for p in pairs):
            raise ValueError(f"config.data.mixture_schedule={text!r}: {part!r} is not 'STEP:name=weight,...'.")
        weights = dict.fromkeys(names, 0.0)
        for name, value in ((n.strip(), v.strip()) for n, v in pairs):
            if name not in weights:
                raise ValueError(f"config.data.mixture_schedule: {name!r} is not a source of the mixture "
                                 f"({', '.join(names)}).")
            try:
                weights[name] = float(value)
            except ValueError:
                raise ValueError(f"config.data.mixture_schedule: {name}={value!r} is not a number.") from None
        out.append((int(match.group(1)), _integer_weights(list(weights.values()), f"config.data.mixture_schedule "
                                                                                   f"at step {match.group(1)}")))
    return out


class MixedRows:
    """The training row stream of a mixture (see the module's docstring): row g of it, for any g >= 0,
    in training order already (the pipeline neither shuffles nor repeats it). Rows of sources with and
    without document masks are given the same arrays."""

    in_training_order = True

    def __init__(self, sources: list[Rows], mixture: Mixture, seed: int, global_batch: int):
        self.sources, self.mixture, self.global_batch = sources, mixture, global_batch
        self.seq_len, self.note = sources[0].seq_len, "; ".join(r.note for r in sources if r.note)
        self._document_mask = any(getattr(r, "document_mask", False) for r in sources)
        self._orders = [grain.MapDataset.range(len(r)).shuffle(seed=seed * 7919 + i).repeat(None)
                        for i, r in enumerate(sources)]
        starts, position = [], [0] * len(sources)  # each segment's first row, and each source's position there
        for i, (step, weights) in enumerate(mixture.schedule):
            starts.append((step * global_batch, tuple(position)))
            if i + 1 < len(mixture.schedule):
                taken = interleave_counts((mixture.schedule[i + 1][0] - step) * global_batch, weights)
                position = [p + t for p, t in zip(position, taken, strict=True)]
        self._starts = starts

    def __len__(self) -> int:
        return sys.maxsize

    def locate(self, g: int) -> tuple[int, int]:
        """(source, row of that source) of row g of the stream."""
        segment = max(i for i, (first, _) in enumerate(self._starts) if first <= g)
        first, position = self._starts[segment]
        source, k = interleave(g - first, self.mixture.schedule[segment][1])
        return source, int(self._orders[source][position[source] + k])

    def __getitem__(self, g: int) -> dict[str, np.ndarray]:
        source, index = self.locate(g)
        row = self.sources[source][index]
        if self._document_mask and "segment_ids" not in row:
            n = int(row["mask"].sum())  # a row of one document: segment 1, positions from 0
            row["segment_ids"] = (np.arange(self.seq_len) < n).astype(np.int32)
            row["positions"] = np.where(row["segment_ids"] > 0, np.arange(self.seq_len), 0).astype(np.int32)
        return row

    def close(self) -> None:
        for rows in self.sources:
            rows.close()
