"""Where the LLM judge is and how it is asked: :class:`JudgeSettings`, and chat requests to any
OpenAI-compatible ``/chat/completions`` (Ollama, vLLM, a hosted API, ``finetune-studio serve``).

urllib, not an HTTP client package: the core stays free of one more dependency, and a judge
needs only a JSON POST. Each request has a timeout; a dropped connection, HTTP 5xx or 429 is
tried once more; a few requests are in flight at once. The key goes in the Authorization header
and nowhere else: not in :meth:`JudgeSettings.to_dict`, the repr, or an error sentence (a
server's message that echoes it is scrubbed). Failures that would repeat on every row (no
server, a refused key, no such model, a reply that is not OpenAI's shape) raise
:class:`JudgeError` with a sentence naming the fix; a request the judge refuses alone (HTTP 400,
e.g. a row too long for its context) comes back as :class:`Refused`, and that row gets no verdict.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, field
from typing import Any

KEY_ENV = "FINETUNE_STUDIO_JUDGE_KEY"
RETRY_WAIT_S = 1.0


class JudgeError(RuntimeError):
    """The judge could not be used (unreachable, refused the key, no such model, not an
    OpenAI-compatible reply): a sentence with the fix. The task scores stand without it."""


class Refused(Exception):
    """The judge refused one request (HTTP 400-class): that row gets no verdict, the rest go on."""


class _Retry(Exception):
    """A failure worth one more try (a dropped connection, HTTP 5xx or 429)."""


@dataclass
class JudgeSettings:
    """Where the judge is and how to ask it. Raises ValueError with every problem at once.

    Example:
        >>> s = JudgeSettings("http://localhost:11434/v1", "qwen2.5:14b")
        >>> s.endpoint
        'http://localhost:11434/v1/chat/completions'
    """

    url: str
    """The API's base URL, e.g. http://localhost:11434/v1 (Ollama), http://localhost:8000/v1 (vLLM)."""
    model: str
    """The judge model's name as the endpoint knows it."""
    key: str | None = field(default=None, repr=False)
    """The API key (default: the FINETUNE_STUDIO_JUDGE_KEY environment variable); sent, never stored."""
    timeout_s: float = 120.0
    """Seconds to wait for one reply before the judge counts as not answering."""
    max_rows: int = 100
    """Judge at most this many rows, spread evenly (4 requests per row)."""
    max_tokens: int = 256
    """Reply length cap: room for a short reason and the verdict line."""
    workers: int = 4
    """Requests in flight at once."""

    def __post_init__(self) -> None:
        if self.key is None:
            self.key = os.environ.get(KEY_ENV) or None
        self.url = (self.url or "").strip().rstrip("/")
        if self.url.endswith("/chat/completions"):  # the full endpoint pasted: keep its base
            self.url = self.url[: -len("/chat/completions")]
        self.model = (self.model or "").strip()
        problems = self.problems()
        if problems:
            raise ValueError(" ".join(problems))

    def problems(self) -> list[str]:
        """Every problem with the settings, each a sentence naming the flag and the fix."""
        out = []
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            out.append(
                f"--judge-url must be an http(s) URL such as http://localhost:11434/v1 (got {self.shown_url!r})."
            )
        if not self.model:
            out.append("--judge-model is required: the judge model's name as its endpoint knows it.")
        if not self.timeout_s > 0:
            out.append(f"--judge-timeout must be more than 0 seconds (got {self.timeout_s}).")
        if self.max_rows < 1:
            out.append(f"--judge-rows must be at least 1 (got {self.max_rows}).")
        if self.max_tokens < 16 or self.workers < 1:
            out.append("The judge needs max_tokens of at least 16 and at least 1 worker.")
        return out

    @property
    def endpoint(self) -> str:
        return self.url + "/chat/completions"

    @property
    def shown_url(self) -> str:
        """The URL as stored and shown: without a user:password@ or a query (where keys hide)."""
        parts = urllib.parse.urlsplit(self.url)
        host = parts.netloc.rpartition("@")[2]
        return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))

    def to_dict(self) -> dict[str, Any]:
        """What is stored with a result: never the key."""
        return {"url": self.shown_url, "model": self.model, "timeout_s": self.timeout_s, "max_rows": self.max_rows}


# ---- asking ------------------------------------------------------------------------------------
def _scrub(text: str, key: str | None) -> str:
    return text.replace(key, "***") if key else text


def _detail(exc: urllib.error.HTTPError, key: str | None) -> str:
    """The server's own words for an HTTP error, short: its JSON error message, else its text."""
    try:
        body = exc.read().decode("utf-8", "replace")
    except OSError:
        return ""
    try:
        data = json.loads(body)
        err = data.get("error", data) if isinstance(data, dict) else data
        body = str(err.get("message") or err.get("detail") or err) if isinstance(err, dict) else str(err)
    except ValueError:
        pass
    body = _scrub(" ".join(body.split()), key)[:200]
    return f": {body}" if body else ""


def _post_once(settings: JudgeSettings, messages: list[dict[str, str]]) -> str:
    body = {"model": settings.model, "messages": messages, "temperature": 0, "max_tokens": settings.max_tokens}
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if settings.key:
        headers["Authorization"] = f"Bearer {settings.key}"
    request = urllib.request.Request(settings.endpoint, json.dumps(body).encode("utf-8"), headers, method="POST")
    url, key = settings.shown_url, settings.key
    timeout = (
        f"The judge at {url} did not answer within {settings.timeout_s:g} s: is it running, with the model "
        "loaded? A slow judge needs a longer --judge-timeout."
    )
    try:
        with urllib.request.urlopen(request, timeout=settings.timeout_s) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        detail = _detail(exc, key)
        if exc.code in (401, 403):
            fix = "pass the right one" if key else "it needs one: pass it"
            raise JudgeError(
                f"The judge at {url} refused the request (HTTP {exc.code}{detail}); {fix} with --judge-key or "
                f"the {KEY_ENV} environment variable."
            ) from None
        if exc.code == 404:
            raise JudgeError(
                f"The judge at {url} answered HTTP 404{detail}: check that the URL is the API's base (it "
                f"usually ends in /v1) and that the model `{settings.model}` is one it serves ({url}/models "
                "lists them)."
            ) from None
        if exc.code == 429 or exc.code >= 500:
            raise _Retry(
                f"The judge at {url} failed with HTTP {exc.code}{detail} (tried twice): look at the judge "
                "server's log, or try again later."
            ) from None
        raise Refused(f"The judge refused this request (HTTP {exc.code}{detail}).") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            raise JudgeError(timeout) from None
        if isinstance(reason, ConnectionRefusedError):
            raise _Retry(
                f"The judge at {url} refused the connection: is the server running, and listening on that "
                "host and port?"
            ) from None
        if isinstance(reason, socket.gaierror):
            raise JudgeError(f"The judge's host in {url} could not be found ({reason}): check the URL.") from None
        raise _Retry(f"The judge at {url} could not be reached ({reason}): check the URL and the network.") from None
    except TimeoutError:
        raise JudgeError(timeout) from None
    except (ConnectionError, http.client.HTTPException) as exc:
        raise _Retry(
            f"The judge at {url} dropped the connection ({type(exc).__name__}): is it an OpenAI-compatible "
            "server, and is it still running?"
        ) from None
    try:
        data = json.loads(raw)
    except ValueError:
        snippet = _scrub(raw[:80].decode("utf-8", "replace"), key)
        raise JudgeError(
            f"The judge at {url} answered with something that is not JSON ({snippet!r}): the URL should be "
            "the API's base, which usually ends in /v1."
        ) from None
    try:
        content = data["choices"][0]["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise JudgeError(
            f"The judge at {url} answered JSON without a chat reply (no choices[0].message): is it an "
            "OpenAI-compatible /chat/completions endpoint?"
        ) from None
    return _scrub(content if isinstance(content, str) else "", key)


def _ask(settings: JudgeSettings, messages: list[dict[str, str]]) -> str | Refused:
    """The judge's reply, or the refusal of this one request. Raises JudgeError."""
    for attempt in range(2):
        try:
            return _post_once(settings, messages)
        except Refused as exc:
            return exc
        except _Retry as exc:
            if attempt:
                raise JudgeError(str(exc)) from None
            time.sleep(RETRY_WAIT_S)
    raise AssertionError("unreachable")


STOPPED = "The judge was stopped before it finished; the task scores are stored without its verdicts."


def ask_all(
    settings: JudgeSettings, conversations: list[list[dict[str, str]]], stop: threading.Event | None = None
) -> list[str | Refused]:
    """Every reply, in order, ``settings.workers`` at a time; the first JudgeError stops the rest,
    and so does ``stop`` (the page's Stop: a JudgeError saying so, checked every quarter second)."""
    pool = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="judge")
    futures = [pool.submit(_ask, settings, c) for c in conversations]
    replies: list[str | Refused] = []
    try:
        for f in futures:
            while True:
                if stop is not None and stop.is_set():
                    raise JudgeError(STOPPED)
                try:
                    replies.append(f.result(timeout=0.25))
                    break
                except FuturesTimeout:
                    continue
        return replies
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # after a failure, queued requests never start
