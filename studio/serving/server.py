"""The OpenAI-compatible API as an app: on its own for `finetune-studio serve` (started by
studio/launch.py), and mounted under ``/v1`` on the UI's server (studio/ui/server.py).
One Studio, one playground: the Chat tab and the endpoint share the loaded base and its adapters.

Loopback by default; any other bind requires an API key (compared in constant time).
"""

from __future__ import annotations

import logging

from studio.models import DEFAULT_MODEL

log = logging.getLogger(__name__)


def serving_context(
    studio,
    model: str = DEFAULT_MODEL,
    api_key: str | None = None,
    max_tokens_cap: int = 2048,
    max_batch: int = 8,
    max_queue: int = 64,
    max_queue_per_client: int | None = None,
    prefix_cache_mb: int = 256,
):
    """The API's context on a Studio: a catalog of the runs on ``model``, an engine on the
    Studio's playground, counters, and the Studio's "training has the device" sentence.
    ``max_queue``: waiting requests beyond which the API answers 503; one client may hold
    ``max_queue_per_client`` of them (default: half) before it gets 429. ``prefix_cache_mb``: the
    K/V kept for shared prompt starts (0: none)."""
    from studio.serving.catalog import Catalog
    from studio.serving.engine import Engine
    from studio.serving.openai_api import ServingContext
    from studio.serving.prefix_cache import PrefixCache

    catalog = Catalog(studio.registry, studio.hardware, model)
    engine = Engine(
        studio.playground,
        catalog.resolve,
        max_batch=max_batch,
        max_queue=max_queue,
        max_queue_per_client=max_queue_per_client if max_queue_per_client is not None else max(1, max_queue // 2),
        prefix_cache=PrefixCache(prefix_cache_mb * 2**20) if prefix_cache_mb > 0 else None,
    )
    ctx = ServingContext(catalog, engine, api_key=api_key, max_tokens_cap=max_tokens_cap, busy=studio.training_busy)
    studio.serving = ctx
    _show_request_log()
    return ctx


def _show_request_log() -> None:
    """The per-request lines (studio/serving/stats.py) are INFO: print them even where nothing
    configured logging (the root logger's last-resort handler shows warnings only)."""
    log = logging.getLogger("studio.serving")
    log.setLevel(logging.INFO)
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        log.addHandler(handler)


def create_app(ctx):
    from fastapi import FastAPI

    from studio.serving.openai_api import create_router

    app = FastAPI(title="Finetune Studio API", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(create_router(ctx))
    return app
