"""Continuous batching: requests share a fixed number of cache slots, one decode step advancing all of
them, a new request joining between two steps as soon as a slot is free and a finished one leaving at once.

The engine runs in a thread of its own (`start`), so that an HTTP server's event loop only queues requests
and reads their output. Each `Request` is a prompt's token ids and its settings; the engine calls its
`emit(event)` from the engine thread with text as it is produced (held back while it may still be the
start of a stop string or an incomplete character) and once at the end with the finish reason:
"stop" (EOS or a stop string), "length" (max_tokens) or "cancelled". `policy="static"` admits requests only
when every slot is free, as one-batch-at-a-time serving does (the benchmark's comparison).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lightjax.model.gpt import GPT
from lightjax.runtime.sharding import Rules, with_mesh
from lightjax.serve.programs import Sampling, cache_shardings, empty_cache, programs, prompt_buckets

POLICIES = ("continuous", "static")


@dataclasses.dataclass(frozen=True)
class Event:
    """A request's output so far: new `text` (and its token ids), and at the end its `finish` reason."""

    text: str = ""
    tokens: tuple[int, ...] = ()
    finish: str | None = None


@dataclasses.dataclass(eq=False)
class Request:
    prompt: Sequence[int]
    max_tokens: int
    emit: Callable[[Event], None]
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int = 0
    ignore_eos: bool = False  # go on to max_tokens past EOS (vLLM's option; benchmarks of fixed lengths)
    # Filled in by the engine.
    tokens: list[int] = dataclasses.field(default_factory=list)
    sent: int = 0  # characters of the decoded text already emitted
    cancelled: bool = False
    times: dict[str, float] = dataclasses.field(default_factory=dict)  # queued, first_token, done


class QueueFull(Exception):
    """The engine's waiting queue is at its bound: the caller answers 429."""


class Engine:
    """Serves `model` (`params` placed already) in `slots` rows of `max_len` tokens each."""

    def __init__(self, model: GPT, params: Any, tokenizer: Any, slots: int = 8, max_len: int | None = None,
                 max_queue: int = 64, policy: str = "continuous", mesh: Any = None, rules: Rules = ()):
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r} is not one of {', '.join(POLICIES)}.")
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.slots, self.max_queue, self.policy = slots, max_queue, policy
        self.max_len = min(max_len or model.config.block_size, model.config.block_size)
        self.mesh, self.rules = mesh, rules
        self.widths = prompt_buckets(self.max_len - 1)
        self._vocab_limit = np.int32(min(tokenizer.vocab_size, model.config.vocab_size))
        self._waiting: collections.deque[Request] = collections.deque()
        self._rows: list[Request | None] = [None] * slots
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self.steps = 0  # decode steps, and the seconds spent in them and in prompts' prefills (since warm-up)
        self.seconds = {"prefill": 0.0, "decode": 0.0}
        with self._under_mesh():  # made by a program, laid out as every later cache: the programs see one kind
            shape = jax.eval_shape(lambda: empty_cache(model, slots, self.max_len))
            layout = None if mesh is None else cache_shardings(shape, mesh, rules)
            self._cache = jax.jit(lambda: empty_cache(model, slots, self.max_len), out_shardings=layout)()
        self._admit, self._step = programs(model, layout, mesh)
        self._tokens = np.zeros(slots, np.int32)
        self._sampling = {"temperature": np.zeros(slots, np.float32), "top_k": np.zeros(slots, np.int32),
                          "top_p": np.ones(slots, np.float32), "key": np.zeros((slots, 2), np.uint32),
                          "count": np.zeros(slots, np.int32)}

    def _under_mesh(self) -> Any:
        return with_mesh(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()

    # --- the caller's side (any thread)

    def submit(self, request: Request) -> None:
        """Queue a request; QueueFull when `max_queue` are already waiting, ValueError for one that cannot
        fit a slot."""
        if not request.prompt:
            raise ValueError("the prompt has no tokens.")
        if len(request.prompt) + request.max_tokens > self.max_len:
            raise ValueError(f"the prompt has {len(request.prompt)} tokens and max_tokens is {request.max_tokens}: "
                             f"together more than the {self.max_len} tokens of the model's context.")
        request.times["queued"] = time.perf_counter()
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already (the bound is {self.max_queue}).")
            self._waiting.append(request)
            self._lock.notify()

    def cancel(self, request: Request) -> None:
        """Stop a request (its client went away): its slot is freed before the next step."""
        with self._lock:
            request.cancelled = True
            self._lock.notify()

    def compiled(self) -> int:
        """How many programs this engine has compiled (warm-up compiles them all; serving adds none)."""
        return self._admit._cache_size() + self._step._cache_size()

    def status(self) -> dict[str, int]:
        with self._lock:
            return {"slots": self.slots, "active": sum(r is not None for r in self._rows),
                    "waiting": len(self._waiting), "steps": self.steps}

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="lightjax-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._running = False
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()

    def warm_up(self) -> int:
        """Compile every program serving can need (each prompt width's admit, the step) by running them
        once on an empty row; returns how many widths."""
        for width in self.widths:
            request = Request([0] * min(width, self.max_len - 1), 1, lambda e: None)
            self._admit_into(0, request)
        self._run_step()
        self._reset()
        return len(self.widths)

    # --- the engine thread

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._running and not self._waiting and not any(self._rows):
                    self._lock.wait()
                if not self._running:
                    return
                self._drop_cancelled()
                admitting = self._take_waiting()
            for row, request in admitting:
                self._admit_into(row, request)
            if any(self._rows):
                self._run_step()

    def _drop_cancelled(self) -> None:
        for i, r in enumerate(self._rows):
            if r is not None and r.cancelled:
                self._finish(i, "cancelled")
        for r in [r for r in self._waiting if r.cancelled]:
            self._waiting.remove(r)
            r.emit(Event(finish="cancelled"))

    def _take_waiting(self) -> list[tuple[int, Request]]:
        free = [i for i, r in enumerate(self._rows) if r is None]
        if self.policy == "static" and len(free) < self.slots:
            return []
        taken = []
        for row in free:
            if not self._waiting:
                break
            request = self._waiting.popleft()
            self._rows[row] = request
            taken.append((row, request))
        return taken

    def _width(self, n: int) -> int:
        return next(w for w in self.widths if w >= n)

    def _admit_into(self, row: int, request: Request) -> None:
        width = self._width(len(request.prompt))
        prompt = np.zeros((1, width), np.int32)
        prompt[0, : len(request.prompt)] = request.prompt
        key = np.asarray(jax.random.key_data(jax.random.PRNGKey(request.seed)), np.uint32)
        settings = {"temperature": np.float32(request.temperature), "top_k": np.int32(request.top_k),
                    "top_p": np.float32(request.top_p), "key": key, "count": np.int32(0)}
        for name, value in settings.items():
            self._sampling[name][row] = value
        one = Sampling(**{k: np.asarray(v)[None] for k, v in settings.items()})
        start = time.perf_counter()
        with self._under_mesh():
            self._cache, token = self._admit(self.params, self._cache, prompt, np.int32(len(request.prompt)),
                                             np.int32(row), one, self._vocab_limit)
        token = int(token)
        self.seconds["prefill"] += time.perf_counter() - start
        self._take_token(row, token)

    def _run_step(self) -> None:
        active = np.array([r is not None for r in self._rows])
        self._sampling["count"] += active
        sampling = Sampling(**{k: jnp.asarray(v) for k, v in self._sampling.items()})
        start = time.perf_counter()
        with self._under_mesh():
            self._cache, tokens = self._step(self.params, self._cache, self._tokens, active, sampling,
                                             self._vocab_limit)
        tokens = np.asarray(tokens).tolist()
        self.seconds["decode"] += time.perf_counter() - start
        self.steps += 1
        for row, token in enumerate(tokens):
            if active[row] and self._rows[row] is not None:
                self._take_token(row, token)

    def _take_token(self, row: int, token: int) -> None:
        request = self._rows[row]
        if request is None:  # warm-up
            return
        self._tokens[row] = token
        request.times.setdefault("first_token", time.perf_counter())
        if token == self.tokenizer.eos_id and not request.ignore_eos:
            self._send(request, self._text(request))  # what was held back
            return self._finish(row, "stop")
        request.tokens.append(token)
        text = self._text(request)
        cut = min((i for i in (text.find(s, max(0, request.sent - len(s))) for s in request.stop if s) if i >= 0),
                  default=-1)
        if cut >= 0:
            self._send(request, text[:cut])
            return self._finish(row, "stop")
        if len(request.tokens) >= request.max_tokens:
            self._send(request, text)
            return self._finish(row, "length")
        self._send(request, text[: len(text) - _held_back(text, request.stop)])

    def _text(self, request: Request) -> str:
        """The request's text so far, special tokens left out (as OpenAI-compatible servers return it)."""
        return self.tokenizer.decode(request.tokens, skip_special_tokens=True)

    def _send(self, request: Request, text: str) -> None:
        if len(text) > request.sent:
            request.emit(Event(text=text[request.sent:]))
            request.sent = len(text)

    def _finish(self, row: int, reason: str) -> None:
        request = self._rows[row]
        self._rows[row] = None
        request.times["done"] = time.perf_counter()
        request.emit(Event(tokens=tuple(request.tokens), finish=reason))

    def _reset(self) -> None:
        self.steps, self.seconds = 0, {"prefill": 0.0, "decode": 0.0}
        with self._under_mesh():
            self._cache = self._cache.replace(index=jnp.zeros_like(self._cache.index))


def _held_back(text: str, stop: Sequence[str]) -> int:
    """How many characters at the end of `text` to hold back: an incomplete character's replacement mark,
    or the longest tail that is the start of a stop string."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    return max((n for s in stop for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)

