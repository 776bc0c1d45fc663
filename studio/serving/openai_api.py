"""The OpenAI-compatible HTTP API: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``
and ``/metrics``, plus vLLM's ``/tokenize``, ``/detokenize`` and ``/tokenizer_info``
(studio/serving/tokenizer_api.py). Shapes follow OpenAI's (``chat.completion``,
``chat.completion.chunk``, ``text_completion``, ``usage``, ``logprobs``, ``data: [DONE]``, errors as
``{"error": {...}}``), so the official ``openai`` client and tools built on it (lm-evaluation-harness's
``local-completions`` and ``local-chat-completions``) work unchanged; ``model`` picks the base or an
adapter per request.

``/v1/completions`` takes a prompt as text or token ids, one or a batch (each prompt is a row of
the engine's batch and a choice of the answer, by index), and ``echo`` / ``logprobs``: with both,
every prompt token's log-probability given those before it, which is what a loglikelihood
(multiple-choice) evaluation reads. Every request is checked before it reaches the engine
(studio/serving/checks.py); each problem is a 400 with a sentence that names the field and the fix.
"""

from __future__ import annotations

import asyncio
import json
import queue
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from studio.models import ModelError
from studio.runs import versions
from studio.serving import checks
from studio.serving.catalog import Catalog, Served
from studio.serving.checks import ApiError, Scoring, authorize
from studio.serving.engine import Engine, Overloaded
from studio.serving.engine import Request as Job
from studio.serving.logprobs import chat_logprobs, completion_logprobs
from studio.serving.stats import Stats
from studio.serving.tokenizer_api import add_tokenizer_routes

REQUEST_TIMEOUT_S = 600.0


@dataclass
class ServingContext:
    """What the API needs: where models come from, who decodes, who counts, who may call."""

    catalog: Catalog
    engine: Engine
    stats: Stats = field(default_factory=Stats)
    api_key: str | None = None
    max_tokens_cap: int = 2048
    busy: Callable[[], str | None] = lambda: None  # a sentence while training has the device


def create_router(ctx: ServingContext) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models(request: Request):
        try:
            authorize(ctx.api_key, request)
        except ApiError as exc:
            return exc.response()
        return {"object": "list", "data": [_model_card(ctx, m) for m in ctx.catalog.models()]}

    @router.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        try:
            authorize(ctx.api_key, request)
            return _model_card(ctx, checks.served(ctx.catalog, model_id, answering=False), lineage=True)
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
            authorize(ctx.api_key, request)
        except ApiError as exc:
            return exc.response()
        text = ctx.stats.prometheus() + ctx.engine.prometheus()
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    add_tokenizer_routes(router, ctx)
    return router


def _model_card(ctx: ServingContext, m: Served, lineage: bool = False) -> dict:
    card = {
        "id": m.id,
        "object": "model",
        "created": m.created,
        "owned_by": "finetune-studio",
        "root": m.id if m.is_base else m.run.id,
        "parent": None if m.is_base else ctx.catalog.base,  # vLLM's convention for adapters
    }
    if not m.is_base:  # which exact weights the id means now (a deployment, or a run's latest)
        card["served"] = m.exact
        if m.deployment:
            card["deployment"] = m.deployment
    if lineage and m.kept is not None:  # GET /v1/models/{id}: what the version is and where it came from
        card["metadata"] = versions.public(m.kept)
    return card


def _tokenizer(ctx: ServingContext, served: Served):
    try:
        return ctx.catalog.tokenizer(served)
    except ModelError as exc:
        raise ApiError(500, str(exc)) from None


def _chat_ids(tokenizer, data: dict) -> list[int]:
    text = tokenizer.apply_chat_template(checks.messages(data), add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ApiError(400, "The prompt is empty after tokenizing.", "messages")
    return ids


@dataclass
class _Asked:
    """A checked request: who answers, the prompts as token ids, and what comes back."""

    served: Served
    prompts: list[list[int]]
    texts: list[str | None]  # each prompt as sent (None: token ids), for echo
    settings: Any
    stops: list[str]
    scoring: Scoring
    stream: bool
    include_usage: bool
    ignore_eos: bool
    tokenizer: Any


async def _ask(ctx: ServingContext, request: Request, chat: bool) -> _Asked:
    authorize(ctx.api_key, request)
    data = await checks.read_json(request)
    served = checks.served(ctx.catalog, data.get("model"))
    scoring = checks.scoring(data, chat)
    settings = checks.settings(data, ctx.max_tokens_cap, allow_zero=scoring.echo)
    stops = checks.stops(data)
    stream = checks.flag(data, "stream")
    options = data.get("stream_options") or {}
    include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
    ignore_eos = checks.flag(data, "ignore_eos")
    tokenizer = _tokenizer(ctx, served)
    if chat:
        prompts, texts = [_chat_ids(tokenizer, data)], [None]
    else:
        prompts, texts = checks.prompts(data, tokenizer, ctx.catalog.vocab_size(served))
    if stream and (len(prompts) > 1 or scoring.logprobs is not None or scoring.echo):
        raise ApiError(
            400, "`stream` answers one prompt without `logprobs` or `echo`; send this request without it.", "stream"
        )
    context = ctx.catalog.context_length(served)
    for n, ids in enumerate(prompts):
        if context and len(ids) + settings.max_new_tokens > context:
            which = "The prompt" if len(prompts) == 1 else f"Prompt {n}"
            raise ApiError(
                400,
                f"{which} is {len(ids)} tokens; with max_tokens {settings.max_new_tokens} it passes the "
                f"model's context of {context} tokens. Shorten the conversation or lower max_tokens.",
                "messages" if chat else "prompt",
                "context_length_exceeded",
            )
    busy = ctx.busy()
    if busy:
        raise ApiError(503, busy, code="busy")
    return _Asked(served, prompts, texts, settings, stops, scoring, stream, include_usage, ignore_eos, tokenizer)


async def _complete(ctx: ServingContext, request: Request, chat: bool):
    try:
        asked = await _ask(ctx, request, chat)
    except ApiError as exc:
        return exc.response({"Retry-After": "30"} if exc.status == 503 else None)
    served = asked.served
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    jobs = [
        Job(
            rid if len(asked.prompts) == 1 else f"{rid}.{n}",
            # The exact weights resolved now (RUN@vN): a promotion before the batch starts cannot
            # change what this request decodes with, nor make its log line name another version.
            None if served.is_base else served.exact,
            ids,
            asked.settings,
            asked.stops,
            asked.tokenizer,
            asked.ignore_eos,
            logprobs=asked.scoring.logprobs,
            echo=asked.scoring.echo,
            client=_client(request),
        )
        for n, ids in enumerate(asked.prompts)
    ]
    try:
        for job in jobs:  # submitted together, so the engine can batch them
            ctx.engine.submit(job)
    except Overloaded as exc:
        for job in jobs:  # a batch of prompts is answered whole or not at all
            job.cancelled.set()
        code = "queue_full" if exc.status == 503 else "rate_limit_exceeded"
        return ApiError(exc.status, str(exc), code=code).response({"Retry-After": str(exc.retry_after_s)})
    shape = _Shape(rid, served.id, int(time.time()), chat)
    headers = {"X-Request-Id": rid}
    if asked.stream:
        return StreamingResponse(
            _sse(ctx, served, jobs[0], shape, asked.include_usage), media_type="text/event-stream", headers=headers
        )
    errors = await asyncio.to_thread(lambda: [_wait(job) for job in jobs])
    for job, error in zip(jobs, errors):
        _record(ctx, served, job, error)
    error = next((e for e in errors if e), None)
    if error:
        for job in jobs:
            job.cancelled.set()
        return ApiError(500, error).response(headers)
    return JSONResponse(shape.full(jobs, asked), headers=headers)


def _client(request: Request) -> str:
    """Who sent a request, for fair turns and per-client limits: its address."""
    return request.client.host if request.client else ""


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
    # The weights the engine decoded with (a run that re-saves mid-request is logged as what
    # answered); the files on disk only for a request that failed before its adapter loaded.
    weights = job.weights_sha256 or ctx.catalog.weights_hash(served)
    ctx.stats.record(served.id, served.exact, weights, job, error)


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

    def full(self, jobs: list[Job], asked: _Asked) -> dict:
        choices, tokenizer, echo = [], asked.tokenizer, asked.scoring.echo
        scored = asked.scoring.logprobs is not None
        for n, (job, text) in enumerate(zip(jobs, asked.texts)):
            logprobs = None
            if self.chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": job.text}}
                if scored:
                    logprobs = chat_logprobs(tokenizer, job.scores, job.completion_tokens)
            else:
                echoed = "" if not echo else text if text is not None else _decoded(asked, job)
                choice = {"index": n, "text": echoed + job.text}
                if scored:
                    logprobs = completion_logprobs(tokenizer, job.prompt_ids, job.prompt_scores, job.scores, echo)
            choices.append(choice | {"finish_reason": job.finish_reason, "logprobs": logprobs})
        prompt = sum(len(j.prompt_ids) for j in jobs)
        completion = sum(j.completion_tokens for j in jobs)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        kind = "chat.completion" if self.chat else "text_completion"
        return self._base(kind) | {"choices": choices, "usage": usage}

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


def _decoded(asked: _Asked, job: Job) -> str:
    """A token-id prompt as text, its special tokens kept (the echo shows what the model read)."""
    return asked.tokenizer.decode(job.prompt_ids, skip_special_tokens=False)
