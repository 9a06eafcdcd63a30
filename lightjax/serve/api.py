"""The OpenAI-compatible HTTP API over an Engine (FastAPI, served by uvicorn in scripts/serve.py):
`/v1/completions`, `/v1/chat/completions` (server-sent events with `stream: true`), `/v1/models`, `/health`.

A bad request is answered in OpenAI's error shape, {"error": {"message", "type", "param", "code"}}, with a
4xx status and one message naming the bad value: malformed JSON, an unknown model, sampling values out of
range, a prompt longer than the context. A full queue answers 429; the server goes on serving.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from lightjax.serve.chat import Chat
from lightjax.serve.engine import Engine, Event, QueueFull
from lightjax.serve.engine import Request as EngineRequest


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code


def error_response(e: BadRequest) -> JSONResponse:
    return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}},
                        status_code=e.status)


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not math.isfinite(value):
        raise BadRequest(f"'{name}' must be {'an integer' if integer else 'a number'} (got {value!r}).", name)
    if not low <= value <= high:
        raise BadRequest(f"'{name}'={value!r} is not in [{low}, {high}].", name)
    return value


def _stops(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise BadRequest(f"'stop' must be a string or a list of up to 4 strings (got {body.get('stop')!r}).", "stop")
    return [s for s in stop if s]


class Api:
    """The routes' logic over `engine`, serving the model named `model_name`."""

    def __init__(self, engine: Engine, model_name: str, chat: Chat | None, chat_why: str = ""):
        self.engine, self.model_name, self.chat, self.chat_why = engine, model_name, chat, chat_why
        self.created = int(time.time())

    def settings(self, body: dict[str, Any]) -> dict[str, Any]:
        """The sampling settings of a request body, each checked (OpenAI's defaults where it gives none)."""
        if body.get("model", self.model_name) != self.model_name:
            raise BadRequest(f"The model {body.get('model')!r} does not exist; this server serves "
                             f"{self.model_name!r}.", "model", 404, code="model_not_found")
        limit = self.engine.max_len - 1
        return {"max_tokens": _number(body, "max_tokens", 16, 1, limit, integer=True),
                "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
                "top_p": _number(body, "top_p", 1.0, 0.0, 1.0), "top_k": _number(body, "top_k", 0, 0, 1 << 30, True),
                "seed": _number(body, "seed", 0, -(1 << 63), (1 << 63) - 1, integer=True),
                "n": _number(body, "n", 1, 1, self.engine.slots, integer=True), "stop": _stops(body),
                "stream": bool(body.get("stream", False)),
                "usage": bool((body.get("stream_options") or {}).get("include_usage", False)),
                "ignore_eos": bool(body.get("ignore_eos", False))}

    def prompt_ids(self, body: dict[str, Any], chat: bool) -> list[int]:
        tokenizer = self.engine.tokenizer
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise BadRequest("'messages' must be a non-empty list of {role, content} with string contents.",
                                 "messages")
            if self.chat is None:
                raise BadRequest(f"This model has no chat format: {self.chat_why}", "messages")
            try:
                return self.chat([{"role": m["role"], "content": m["content"]} for m in messages])
            except ValueError as e:
                raise BadRequest(str(e), "messages") from None
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest(f"'prompt' must be a non-empty string (got {prompt!r}).", "prompt")
        return tokenizer.encode_with_special_tokens(prompt).tolist()

    def check_length(self, ids: list[int], max_tokens: int) -> None:
        context = self.engine.max_len
        if len(ids) + max_tokens > context:
            raise BadRequest(f"This model's maximum context length is {context} tokens. However, you requested "
                             f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the "
                             "completion). Please reduce the prompt or max_tokens.", "max_tokens",
                             code="context_length_exceeded")

    def submit(self, ids: list[int], s: dict[str, Any]) -> tuple[list[EngineRequest], asyncio.Queue]:
        """The n engine requests of a body, queued; their events arrive on the returned queue as (i, Event)."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        requests = []
        for i in range(s["n"]):
            def emit(event: Event, i: int = i) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, (i, event))

            requests.append(EngineRequest(ids, s["max_tokens"], emit, s["temperature"], s["top_k"], s["top_p"],
                                          s["stop"], s["seed"] + i, s["ignore_eos"]))
        try:
            for r in requests:
                self.engine.submit(r)
        except QueueFull as e:
            for r in requests:
                self.engine.cancel(r)
            raise BadRequest(f"The server is busy: {e} Retry later.", None, 429, "rate_limit_error") from None
        return requests, queue


def _chunk(kind: str, rid: str, created: int, model: str, index: int, event: Event, first: bool) -> dict[str, Any]:
    if kind == "chat":
        delta = {"role": "assistant", "content": ""} if first else {}
        delta |= {"content": event.text} if event.text else {}
        choice = {"index": index, "delta": delta, "finish_reason": _reason(event.finish)}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    choice = {"index": index, "text": event.text, "logprobs": None, "finish_reason": _reason(event.finish)}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def _reason(finish: str | None) -> str | None:
    return None if finish is None else ("length" if finish == "length" else "stop")


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _complete(api: Api, http: Request, kind: str) -> Any:
    try:
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"The body is not valid JSON: {e}.") from None
        if not isinstance(body, dict):
            raise BadRequest("The body must be a JSON object.")
        s = api.settings(body)
        ids = api.prompt_ids(body, kind == "chat")
        api.check_length(ids, s["max_tokens"])
        requests, queue = api.submit(ids, s)
    except BadRequest as e:
        return error_response(e)
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if s["stream"]:
        return StreamingResponse(_stream(api, requests, queue, kind, rid, created, len(ids) if s["usage"] else None),
                                 media_type="text/event-stream")
    texts, reasons, tokens = [""] * len(requests), [None] * len(requests), 0
    try:
        while any(r is None for r in reasons):
            try:
                i, event = await asyncio.wait_for(queue.get(), timeout=0.5)
            except TimeoutError:
                if await http.is_disconnected():
                    return None
                continue
            texts[i] += event.text
            if event.finish:
                reasons[i], tokens = event.finish, tokens + len(event.tokens)
    finally:
        for r in requests:
            api.engine.cancel(r)  # a no-op for finished ones; frees the slots of a client that went away
    if kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": _reason(f)}
                   for i, (t, f) in enumerate(zip(texts, reasons, strict=True))]
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": _reason(f)}
                   for i, (t, f) in enumerate(zip(texts, reasons, strict=True))]
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
            "model": api.model_name, "choices": choices, "usage": _usage(len(ids), tokens)}


async def _stream(api: Api, requests: list[EngineRequest], queue: asyncio.Queue, kind: str, rid: str, created: int,
                  prompt_tokens: int | None) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text of each choice, its last with the finish reason; with
    `prompt_tokens` (stream_options.include_usage) a last chunk of usage and no choices; then [DONE]."""
    done, first, tokens = 0, set(), 0
    try:
        while done < len(requests):
            i, event = await queue.get()
            if event.finish == "cancelled":
                done += 1
                continue
            yield f"data: {json.dumps(_chunk(kind, rid, created, api.model_name, i, event, i not in first))}\n\n"
            first.add(i)
            if event.finish:
                done, tokens = done + 1, tokens + len(event.tokens)
        if prompt_tokens is not None:
            usage = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                     "created": created, "model": api.model_name, "choices": [], "usage": _usage(prompt_tokens, tokens)}
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or all are done): free their slots at once
        for r in requests:
            api.engine.cancel(r)


def create_app(engine: Engine, model_name: str, chat: Chat | None = None, chat_why: str = "") -> FastAPI:
    """The FastAPI app serving `engine` (started by the caller) as `model_name`."""
    api = Api(engine, model_name, chat, chat_why)
    app = FastAPI(title="lightjax", docs_url=None, redoc_url=None)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **engine.status()}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": api.created,
                                            "owned_by": "lightjax"}]}

    @app.post("/v1/completions")
    async def completions(http: Request) -> Any:
        return await _complete(api, http, "text")

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request) -> Any:
        return await _complete(api, http, "chat")

    return app
