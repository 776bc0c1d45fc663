"""The OpenAI-compatible HTTP API: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``
and ``/metrics``. Shapes follow OpenAI's (``chat.completion``, ``chat.completion.chunk``,
``usage``, ``data: [DONE]``, errors as ``{"error": {...}}``), so the official ``openai`` client
and tools built on it work unchanged; ``model`` picks the base or an adapter per request.

Every request is checked before it reaches the engine: body size, field types and ranges,
``max_tokens`` against the cap and the model's context; each problem is a 400 with a sentence
that names the field and the fix.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import queue
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from studio.inference.playground import SamplingSettings
from studio.models import ModelError
from studio.serving.catalog import Catalog, Served
from studio.serving.engine import Engine
from studio.serving.engine import Request as Job
from studio.serving.stats import Stats

MAX_BODY_BYTES = 1 << 20  # 1 MiB of JSON is far more than any chat a small model can take
DEFAULT_MAX_TOKENS = 256
MAX_STOP = 4
REQUEST_TIMEOUT_S = 600.0
ROLES = ("system", "user", "assistant")


@dataclass
class ServingContext:
    """What the API needs: where models come from, who decodes, who counts, who may call."""

    catalog: Catalog
    engine: Engine
    stats: Stats = field(default_factory=Stats)
    api_key: str | None = None
    max_tokens_cap: int = 2048
    busy: Callable[[], str | None] = lambda: None  # a sentence while training has the device


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self, headers: dict | None = None) -> JSONResponse:
        kind = {401: "authentication_error", 404: "invalid_request_error", 503: "server_busy"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def create_router(ctx: ServingContext) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models(request: Request):
        try:
            _authorize(ctx, request)
        except ApiError as exc:
            return exc.response()
        return {"object": "list", "data": [_model_card(ctx, m) for m in ctx.catalog.models()]}

    @router.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        try:
            _authorize(ctx, request)
            return _model_card(ctx, _served(ctx, model_id))
        except ApiError as exc:
            return exc.response()

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _complete(ctx, request, chat=True)

    @router.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(ctx, request, chat=False)

    @router.get("/metrics")
    async def metrics(request: Request):
        try:
            _authorize(ctx, request)
        except ApiError as exc:
            return exc.response()
        return PlainTextResponse(ctx.stats.prometheus(), media_type="text/plain; version=0.0.4")

    return router


def _authorize(ctx: ServingContext, request: Request) -> None:
    if ctx.api_key is None:
        return
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header[:7].lower() == "bearer " else ""
    # Constant-time comparison: the time taken never tells how much of a guess was right.
    if not hmac.compare_digest(given.encode(), ctx.api_key.encode()):
        raise ApiError(
            401,
            "Missing or wrong API key: send the header `Authorization: Bearer <key>` with the key the "
            "server was started with (--api-key).",
            code="invalid_api_key",
        )


def _served(ctx: ServingContext, model_id: Any) -> Served:
    if not isinstance(model_id, str) or not model_id.strip():
        raise ApiError(400, "`model` is required: the base's name or an adapter's id from GET /v1/models.", "model")
    try:
        return ctx.catalog.get(model_id)
    except LookupError as exc:
        raise ApiError(404, str(exc), "model", "model_not_found") from None
    except ValueError as exc:
        raise ApiError(400, str(exc), "model") from None


def _model_card(ctx: ServingContext, m: Served) -> dict:
    return {
        "id": m.id,
        "object": "model",
        "created": m.created,
        "owned_by": "finetune-studio",
        "root": m.id if m.is_base else m.run.id,
        "parent": None if m.is_base else ctx.catalog.base,  # vLLM's convention for adapters
    }


async def _read_json(request: Request) -> dict:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"The request body is over {MAX_BODY_BYTES // 1024} KiB; send a shorter conversation.")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, f"The request body is over {MAX_BODY_BYTES // 1024} KiB; send a shorter conversation.")
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        raise ApiError(400, "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return data


def _number(data: dict, name: str, default: float, low: float, high: float, integer: bool = False) -> float:
    value = data.get(name)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"`{name}` must be {kind} from {low:g} to {high:g} (got {value!r}).", name)
    return value


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        parts = []
        for p in content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ApiError(400, f"{where}: only text parts are supported (got type {p.get('type')!r}).", "messages")
            parts.append(p["text"])
        return "".join(parts)
    raise ApiError(400, f"{where}: `content` must be a string or a list of text parts.", "messages")


def _messages(data: dict) -> list[dict[str, str]]:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list of {role, content} objects.", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"`messages[{i}].role` must be one of {', '.join(ROLES)}.", "messages")
        out.append({"role": m["role"], "content": _text_of(m.get("content"), f"`messages[{i}]`")})
    return out


def _stops(data: dict) -> list[str]:
    stop = data.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"`stop` must be a non-empty string or a list of at most {MAX_STOP} of them.", "stop")
    return stops


def _settings(ctx: ServingContext, data: dict) -> SamplingSettings:
    if data.get("n", 1) != 1:
        raise ApiError(400, "`n` must be 1: send one request per completion.", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if data.get(name) not in (None, 0, 0.0):
            raise ApiError(400, f"`{name}` is not supported; leave it out (or 0).", name)
    limit = data.get("max_completion_tokens", data.get("max_tokens"))
    max_tokens = _number({"max_tokens": limit}, "max_tokens", DEFAULT_MAX_TOKENS, 1, ctx.max_tokens_cap, integer=True)
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"`seed` must be an integer (got {seed!r}).", "seed")
    return SamplingSettings(
        max_new_tokens=int(max_tokens),
        temperature=float(_number(data, "temperature", 1.0, 0, 2)),
        top_p=float(_number(data, "top_p", 1.0, 0.0001, 1)),
        seed=(seed if seed is not None else random.randrange(2**31)) % 2**63,
    )


def _prompt_ids(ctx: ServingContext, served: Served, data: dict, chat: bool) -> tuple[list[int], Any]:
    try:
        tokenizer = ctx.catalog.tokenizer(served)
    except ModelError as exc:
        raise ApiError(500, str(exc)) from None
    if chat:
        text = tokenizer.apply_chat_template(_messages(data), add_generation_prompt=True, tokenize=False)
    else:
        prompt = data.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "`prompt` must be a non-empty string.", "prompt")
        text = prompt
    ids = tokenizer(text, add_special_tokens=not chat)["input_ids"]
    if not ids:
        raise ApiError(400, "The prompt is empty after tokenizing.", "prompt")
    return ids, tokenizer


async def _complete(ctx: ServingContext, request: Request, chat: bool):
    try:
        _authorize(ctx, request)
        data = await _read_json(request)
        served = _served(ctx, data.get("model"))
        settings = _settings(ctx, data)
        stops = _stops(data)
        stream = data.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "`stream` must be true or false.", "stream")
        options = data.get("stream_options") or {}
        include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
        ignore_eos = data.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise ApiError(400, "`ignore_eos` must be true or false.", "ignore_eos")
        ids, tokenizer = _prompt_ids(ctx, served, data, chat)
        context = ctx.catalog.context_length(served)
        if context and len(ids) + settings.max_new_tokens > context:
            raise ApiError(
                400,
                f"The prompt is {len(ids)} tokens; with max_tokens {settings.max_new_tokens} it passes the "
                f"model's context of {context} tokens. Shorten the conversation or lower max_tokens.",
                "messages" if chat else "prompt",
                "context_length_exceeded",
            )
        busy = ctx.busy()
        if busy:
            raise ApiError(503, busy, code="busy")
    except ApiError as exc:
        return exc.response({"Retry-After": "30"} if exc.status == 503 else None)
    prefix = "chatcmpl" if chat else "cmpl"
    job = Job(
        f"{prefix}-{uuid.uuid4().hex[:24]}",
        None if served.is_base else served.id,
        ids,
        settings,
        stops,
        tokenizer,
        ignore_eos,
    )
    ctx.engine.submit(job)
    shape = _Shape(job.id, served.id, int(time.time()), chat)
    headers = {"X-Request-Id": job.id}
    if stream:
        return StreamingResponse(
            _sse(ctx, served, job, shape, include_usage), media_type="text/event-stream", headers=headers
        )
    error = await asyncio.to_thread(_wait, job)
    _record(ctx, served, job, error)
    if error:
        return ApiError(500, error).response(headers)
    return JSONResponse(shape.full(job), headers=headers)


def _wait(job: Job) -> str | None:
    """Block until the job ends; its error sentence, or None."""
    deadline = time.monotonic() + REQUEST_TIMEOUT_S
    while True:
        try:
            kind, value = job.events.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            job.cancelled.set()
            return f"The request took longer than {REQUEST_TIMEOUT_S:.0f} s and was cancelled."
        if kind == "done":
            return None
        if kind == "error":
            return value


def _sse(ctx: ServingContext, served: Served, job: Job, shape: _Shape, include_usage: bool) -> Iterator[str]:
    error = "The client went away."
    try:
        yield _event(shape.chunk({"role": "assistant", "content": ""} if shape.chat else "", None, include_usage))
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while True:
            try:
                kind, value = job.events.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                job.cancelled.set()
                error = f"The request took longer than {REQUEST_TIMEOUT_S:.0f} s and was cancelled."
                yield _event(ApiError(500, error).response().body.decode())
                break
            if kind == "text":
                yield _event(shape.chunk({"content": value} if shape.chat else value, None, include_usage))
            elif kind == "error":
                error = value
                yield _event(json.dumps({"error": {"message": value, "type": "server_error"}}))
                break
            else:
                error = None
                yield _event(shape.chunk({} if shape.chat else "", job.finish_reason, include_usage))
                if include_usage:
                    yield _event(shape.usage_chunk(job))
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a client that left stops its row at the next step
        _record(ctx, served, job, error)


def _event(payload: str | dict) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _record(ctx: ServingContext, served: Served, job: Job, error: str | None) -> None:
    ctx.stats.record(served.id, served.version, ctx.catalog.weights_hash(served), job, error)


@dataclass
class _Shape:
    """OpenAI's response objects for one request."""

    id: str
    model: str
    created: int
    chat: bool

    def _base(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "system_fingerprint": None}

    @staticmethod
    def _usage(job: Job) -> dict:
        prompt, completion = len(job.prompt_ids), job.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def full(self, job: Job) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": job.text}}
        else:
            choice = {"index": 0, "text": job.text}
        choice |= {"finish_reason": job.finish_reason, "logprobs": None}
        kind = "chat.completion" if self.chat else "text_completion"
        return self._base(kind) | {"choices": [choice], "usage": self._usage(job)}

    def chunk(self, delta: dict | str, finish_reason: str | None, include_usage: bool) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason}
        out = self._base("chat.completion.chunk" if self.chat else "text_completion") | {"choices": [choice]}
        return out | ({"usage": None} if include_usage else {})

    def usage_chunk(self, job: Job) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._base(kind) | {"choices": [], "usage": self._usage(job)}
