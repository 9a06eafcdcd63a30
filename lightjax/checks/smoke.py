"""The smoke test: overfit one fixed batch and check that every parameter, layer by layer, gets a
gradient. `scripts/smoke_test.py` is a thin command line over `overfit_one_batch`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lightjax.data.pipeline import train_iterator
from lightjax.data.rows import TokenRows
from lightjax.data.sources import load_split
from lightjax.data.tokenizers import make_tokenizer
from lightjax.data.tokens import token_stream
from lightjax.model.gpt import unstack_layers
from lightjax.runtime.sharding import shard_batch
from lightjax.train.loss import make_loss_fn
from lightjax.train.run import Run, build_run
from lightjax.train.step import Step


@dataclasses.dataclass
class SmokeResult:
    losses: list[float]  # loss before each update, the first one at the initial parameters
    seconds: float
    leaves_checked: int  # parameter leaves, counted per layer
    dead_leaves: list[str]  # leaves whose first gradient is zero or not finite
    min_reduction: float

    @property
    def initial_loss(self) -> float:
        return self.losses[0]

    @property
    def final_loss(self) -> float:
        return self.losses[-1]

    @property
    def reduction(self) -> float:
        return 1.0 - self.final_loss / self.initial_loss

    @property
    def passed(self) -> bool:
        return self.reduction >= self.min_reduction and not self.dead_leaves and np.isfinite(self.final_loss)

    def table(self) -> str:
        rows = [("initial loss", f"{self.initial_loss:.4f}"), ("final loss", f"{self.final_loss:.4f}"),
                ("reduction", f"{self.reduction:.1%} (needs >= {self.min_reduction:.0%})"),
                ("steps", f"{len(self.losses) - 1}"), ("seconds", f"{self.seconds:.1f}"),
                ("leaves checked", f"{self.leaves_checked} ({len(self.dead_leaves)} without gradient)")]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def fixed_batch(config: Any) -> dict[str, np.ndarray]:
    """The first training batch of the configured data, tokenizer and seed."""
    docs = load_split(config.data, "train")
    tokenizer = make_tokenizer(config.data.tokenizer, docs)
    rows = TokenRows(token_stream(docs, tokenizer), config.data.seq_len)
    it = train_iterator(rows, config.train.global_batch_size, config.train.seed)
    try:
        return {k: np.asarray(v) for k, v in next(it).items()}
    finally:
        if hasattr(it, "close"):
            it.close()


def _per_layer(tree: Any) -> dict[str, Any]:
    """Flat {path: array} with a scanned layer stack split back into its layers."""
    tree = unstack_layers(tree) if "h" in tree else tree
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


def gradient_flow(run: Run, params: Any, batch: Any) -> tuple[int, list[str]]:
    """(leaves checked, names of leaves whose gradient is all zero or not finite) for one batch."""
    loss_fn = make_loss_fn(run.model)

    def grads(params: Any, batch: Any) -> Any:
        return jax.grad(lambda p: loss_fn(p, batch, jax.random.PRNGKey(0))[0])(params)

    fn = Step(jax.jit(grads, in_shardings=(run.shardings.params, None)), run.mesh, run.rules)
    norms = {k: float(jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)))))
             for k, g in _per_layer(fn(params, batch)).items()}
    return len(norms), sorted(k for k, n in norms.items() if not (np.isfinite(n) and n > 0))


def overfit_one_batch(config: Any, steps: int | None = None, min_reduction: float = 0.95,
                      devices: list[jax.Device] | None = None) -> SmokeResult:
    """Train `steps` (default config.train.max_steps) updates on one fixed batch; check that every
    parameter leaf, layer by layer, gets a non-zero finite gradient on the first."""
    steps = config.train.max_steps if steps is None else steps
    run = build_run(config, devices)
    batch = shard_batch(fixed_batch(config), run.mesh)
    state = run.init_state()
    start = time.perf_counter()
    checked, dead = gradient_flow(run, state.params, batch)
    losses = []
    for _ in range(steps):
        state, metrics = run.train_step(state, batch)
        # The loss before this update. Reading it back each step also bounds the steps in flight: on
        # simulated CPU devices a deep queue of collective programs can starve XLA's rendezvous.
        losses.append(float(metrics["loss"]))
    final = float(run.eval_step(state.params, batch)["nll_sum"]) / batch["tokens"][:, 1:].size
    return SmokeResult(losses + [final], time.perf_counter() - start, checked, dead, min_reduction)
