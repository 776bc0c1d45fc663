"""`finetune-studio serve`: the OpenAI-compatible API on its own, and the same API mounted under
``/v1`` on the UI's server (studio/ui/server.py). One Studio, one playground: the Chat tab and
the endpoint share the loaded base and its adapters.

Loopback by default; any other bind requires an API key (compared in constant time).
"""

from __future__ import annotations

import argparse
import logging

from studio.models import DEFAULT_MODEL

log = logging.getLogger(__name__)


def serving_context(studio, model: str = DEFAULT_MODEL, api_key: str | None = None, max_tokens_cap: int = 2048):
    """The API's context on a Studio: a catalog of the runs on ``model``, an engine on the
    Studio's playground, counters, and the Studio's "training has the device" sentence."""
    from studio.serving.catalog import Catalog
    from studio.serving.engine import Engine
    from studio.serving.openai_api import ServingContext

    catalog = Catalog(studio.registry, studio.hardware, model)
    engine = Engine(studio.playground, catalog.resolve)
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


def add_serve_args(p: argparse.ArgumentParser) -> None:
    from studio.server_args import add_api_key_arg

    p.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1: this machine only).")
    p.add_argument("--port", type=int, default=8000, help="Port to serve on (default 8000).")
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="Base model: its adapters are served next to it (default: default)."
    )
    p.add_argument(
        "--runs-dir", default=None, help="Folder that holds runs (default ./runs or $FINETUNE_STUDIO_RUNS_DIR)."
    )
    p.add_argument("--max-tokens", type=int, default=2048, help="Largest max_tokens a request may ask for.")
    add_api_key_arg(p)


def serve(args: argparse.Namespace) -> int:
    """Check the bind, load the base, then answer until stopped."""
    from studio.server_args import refuse_unservable, resolve_api_key

    api_key = resolve_api_key(args.host, args.api_key)
    if not 1 <= args.max_tokens <= 4096:
        raise SystemExit(f"--max-tokens must be between 1 and 4096 (got {args.max_tokens}).")
    refuse_unservable(args.host, args.port, args.runs_dir)

    import uvicorn

    from studio.service import Studio
    from studio.warmup import preload

    print("Loading libraries...", flush=True)
    preload()
    studio = Studio(args.runs_dir)
    ctx = serving_context(studio, args.model, api_key, args.max_tokens)
    models = ctx.catalog.models()
    print(
        f"OpenAI-compatible API on http://{args.host}:{args.port}/v1  ({len(models) - 1} adapters on "
        f"{args.model!r}; runs in {studio.runs_root.resolve()}"
        f"{'; key required' if api_key else ''})",
        flush=True,
    )
    uvicorn.run(create_app(ctx), host=args.host, port=args.port, log_level="warning")
    return 0
