"""Reading a request: the key, the JSON body and every field, checked before anything reaches
the engine. Each problem is an :class:`ApiError` that answers in OpenAI's error shape with a
sentence naming the field and the fix; a field we do not honour is refused the same way rather
than ignored (a client asking for ``logprobs`` must get numbers or a reason, never a silent null).
"""

from __future__ import annotations

import hmac
import json
import random
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from studio.inference.playground import SamplingSettings
from studio.serving.catalog import Catalog, Served

MAX_BODY_BYTES = 1 << 20  # 1 MiB of JSON is far more than any chat a small model can take
DEFAULT_MAX_TOKENS = 256
MAX_STOP = 4
MAX_LOGPROBS = 20  # alternatives per token, as vLLM caps them (OpenAI: 5 for completions, 20 for chat)
MAX_PROMPTS = 128  # prompts in one /v1/completions batch (lm-eval sends its batch_size)
ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self, headers: dict | None = None) -> JSONResponse:
        kinds = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error", 503: "server_busy"}
        kind = kinds.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


@dataclass
class Scoring:
    """What a request asks for besides text: log-probabilities and the prompt echoed back."""

    logprobs: int | None = None  # alternatives per token (0-20); None: no log-probabilities
    echo: bool = False  # the prompt comes back before the completion (with its scores if logprobs)


def authorize(api_key: str | None, request: Request) -> None:
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header[:7].lower() == "bearer " else ""
    # Constant-time comparison: the time taken never tells how much of a guess was right.
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise ApiError(
            401,
            "Missing or wrong API key: send the header `Authorization: Bearer <key>` with the key the "
            "server was started with (--api-key).",
            code="invalid_api_key",
        )


def served(catalog: Catalog, model_id: Any, answering: bool = True) -> Served:
    """The catalog's entry for a request's ``model``; ``answering``: it is to answer, so a version
    trained on a base that changed since is refused (its model card is still shown)."""
    if not isinstance(model_id, str) or not model_id.strip():
        raise ApiError(400, "`model` is required: the base's name or an adapter's id from GET /v1/models.", "model")
    try:
        found = catalog.get(model_id)
        if answering:
            catalog.check_base(found)
        return found
    except LookupError as exc:
        raise ApiError(404, str(exc), "model", "model_not_found") from None
    except ValueError as exc:
        raise ApiError(400, str(exc), "model") from None


async def read_json(request: Request) -> dict:
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


def number(data: dict, name: str, default: float, low: float, high: float, integer: bool = False) -> float:
    value = data.get(name)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"`{name}` must be {kind} from {low:g} to {high:g} (got {value!r}).", name)
    return value


def flag(data: dict, name: str, default: bool = False) -> bool:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"`{name}` must be true or false (got {value!r}).", name)
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


def messages(data: dict) -> list[dict[str, str]]:
    listed = data.get("messages")
    if not isinstance(listed, list) or not listed:
        raise ApiError(400, "`messages` must be a non-empty list of {role, content} objects.", "messages")
    out = []
    for i, m in enumerate(listed):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"`messages[{i}].role` must be one of {', '.join(ROLES)}.", "messages")
        out.append({"role": m["role"], "content": _text_of(m.get("content"), f"`messages[{i}]`")})
    return out


def stops(data: dict) -> list[str]:
    stop = data.get("stop")
    listed = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(listed, list) or len(listed) > MAX_STOP or not all(isinstance(s, str) and s for s in listed):
        raise ApiError(400, f"`stop` must be a non-empty string or a list of at most {MAX_STOP} of them.", "stop")
    return listed


def settings(data: dict, max_tokens_cap: int, allow_zero: bool = False) -> SamplingSettings:
    """The sampling settings; ``allow_zero``: ``max_tokens`` 0 (a prompt echoed and scored only)."""
    if data.get("n", 1) != 1:
        raise ApiError(400, "`n` must be 1: send one request per completion.", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if data.get(name) not in (None, 0, 0.0):
            raise ApiError(400, f"`{name}` is not supported; leave it out (or 0).", name)
    if data.get("logit_bias"):
        raise ApiError(400, "`logit_bias` is not supported; leave it out.", "logit_bias")
    limit = data.get("max_completion_tokens", data.get("max_tokens"))
    low = 0 if allow_zero else 1
    max_tokens = number({"max_tokens": limit}, "max_tokens", DEFAULT_MAX_TOKENS, low, max_tokens_cap, integer=True)
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"`seed` must be an integer (got {seed!r}).", "seed")
    return SamplingSettings(
        max_new_tokens=int(max_tokens),
        temperature=float(number(data, "temperature", 1.0, 0, 2)),
        top_p=float(number(data, "top_p", 1.0, 0.0001, 1)),
        seed=(seed if seed is not None else random.randrange(2**31)) % 2**63,
    )


def scoring(data: dict, chat: bool) -> Scoring:
    """``logprobs`` / ``top_logprobs`` (chat) or ``logprobs`` / ``echo`` (completions), checked."""
    if chat:
        wanted = flag(data, "logprobs")
        top = data.get("top_logprobs")
        if top is not None and not wanted:
            raise ApiError(400, "`top_logprobs` needs `logprobs: true`.", "top_logprobs")
        k = number(data, "top_logprobs", 0, 0, MAX_LOGPROBS, integer=True)
        return Scoring(int(k) if wanted else None)
    if data.get("best_of") not in (None, 1):
        raise ApiError(400, "`best_of` must be 1: send one request per completion.", "best_of")
    if data.get("suffix"):
        raise ApiError(400, "`suffix` (insertion) is not supported; leave it out.", "suffix")
    k = number(data, "logprobs", -1, 0, MAX_LOGPROBS, integer=True)
    return Scoring(None if k == -1 else int(k), flag(data, "echo"))


def token_ids(ids: list, where: str, vocab: int, param: str = "prompt", allow_empty: bool = False) -> list[int]:
    """``ids`` checked: integers inside the vocabulary (an id past it would fail inside the
    model's embedding, for every row of the batch it landed in)."""
    if not ids and not allow_empty:
        raise ApiError(400, f"`{where}` is an empty list of token ids; send at least one token.", param)
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise ApiError(
                400,
                f"`{where}[{i}]` is {t!r}: token ids must be integers from 0 to {vocab - 1} (this model's vocabulary).",
                param,
            )
    return list(ids)


def prompts(data: dict, tokenizer, vocab: int) -> tuple[list[list[int]], list[str | None]]:
    """A completion's ``prompt`` in any of OpenAI's four forms (a string, a list of strings, a
    list of token ids, a list of such lists) as token ids per prompt, with each string prompt's
    text (None for token ids: its echo is the ids decoded)."""
    prompt = data.get("prompt")
    usage = "`prompt` must be a non-empty string, a list of strings, a list of token ids, or a list of such lists"
    single = isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int))
    if single:
        prompt = [prompt]  # one prompt: a string, or token ids
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(400, f"{usage}.", "prompt")
    if len(prompt) > MAX_PROMPTS:
        raise ApiError(400, f"`prompt` holds {len(prompt)} prompts; send at most {MAX_PROMPTS} per request.", "prompt")
    ids, texts = [], []
    for n, p in enumerate(prompt):
        where = "prompt" if single else f"prompt[{n}]"
        if isinstance(p, str):
            if not p:
                raise ApiError(400, f"`{where}` is an empty string; send text or token ids.", "prompt")
            ids.append(tokenizer(p, add_special_tokens=True)["input_ids"])
            texts.append(p)
            if not ids[-1]:
                raise ApiError(400, f"`{where}` is empty after tokenizing.", "prompt")
        elif isinstance(p, list):
            ids.append(token_ids(p, where, vocab))
            texts.append(None)
        else:
            raise ApiError(400, f"{usage} (`{where}` is {type(p).__name__}).", "prompt")
    return ids, texts
