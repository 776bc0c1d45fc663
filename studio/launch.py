"""Starting a server: the flags of `python app.py`, `finetune-studio ui` and `finetune-studio serve`,
the checks that refuse a bind (unsafe without a password or key, a busy port) in one sentence before
anything slow loads, and `serve`'s start (the UI's is studio/ui/server.py, the only one that imports gradio)."""

from __future__ import annotations

import argparse
import ipaddress
import os

AUTH_ENV = "FINETUNE_STUDIO_AUTH"
API_KEY_ENV = "FINETUNE_STUDIO_API_KEY"
MIN_API_KEY = 16  # characters: a key is a secret, not a PIN


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1: this machine only).")
    p.add_argument("--port", type=int, default=7860, help="Port to serve on (default 7860).")
    p.add_argument(
        "--auth",
        default=None,
        help=f"user:pass required to open the page; also read from ${AUTH_ENV}. "
        "Required when --host is not a loopback address.",
    )
    add_api_key_arg(p)
    p.add_argument(
        "--runs-dir", default=None, help="Folder that holds runs (default ./runs or $FINETUNE_STUDIO_RUNS_DIR)."
    )


def add_api_key_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--api-key",
        default=None,
        help=f"Key the OpenAI-compatible API (/v1) requires as `Authorization: Bearer KEY`; also read from "
        f"${API_KEY_ENV}. Required when --host is not a loopback address.",
    )


def is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_auth(host: str, auth: str | None) -> tuple[str, str] | None:
    """The (user, password) pair to require, or None for a loopback bind without auth.

    Raises:
        SystemExit: a non-loopback bind without credentials, or malformed credentials.
    """
    auth = auth or os.environ.get(AUTH_ENV)
    if auth:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise SystemExit("--auth must look like user:password (both parts non-empty).")
        return user, password
    if not is_loopback(host):
        raise SystemExit(
            f"Refusing to serve on {host} without a password: anyone who can reach it could "
            f"train and read your data. Add --auth user:password (or set ${AUTH_ENV})."
        )
    return None


def resolve_api_key(host: str, key: str | None) -> str | None:
    """The API key to require, or None for a loopback bind without one.

    Raises:
        SystemExit: a key too short to be a secret, or a non-loopback bind without a key.
    """
    key = key or os.environ.get(API_KEY_ENV) or None
    if key is not None and (len(key) < MIN_API_KEY or any(ch.isspace() for ch in key)):
        raise SystemExit(
            f"--api-key must be at least {MIN_API_KEY} characters without spaces; make one with "
            '`python -c "import secrets; print(secrets.token_urlsafe(24))"`.'
        )
    if key is None and not is_loopback(host):
        raise SystemExit(
            f"Refusing to serve the API on {host} without a key: anyone who can reach it could use "
            f"your models. Add --api-key KEY (or set ${API_KEY_ENV})."
        )
    return key


def ui_api_key(host: str, key: str | None) -> tuple[bool, str | None]:
    """Whether the page's server also serves the API (/v1), and the key it requires. The page's
    password does not cover the API, so beyond loopback the API is served only with a key."""
    key = key or os.environ.get(API_KEY_ENV) or None
    if key is None and not is_loopback(host):
        return False, None
    return True, resolve_api_key(host, key)


def refuse_unservable(host: str, port: int, runs_dir: str | None) -> None:
    """Raise SystemExit with one sentence for a port nothing can serve on or a runs folder that
    cannot be written: what every server checks before anything slow loads."""
    from studio.runs.registry import RunRegistry, RunsFolderError

    check_port_free(host, port)
    try:
        RunRegistry(runs_dir).check_writable()
    except RunsFolderError as exc:
        raise SystemExit(str(exc)) from None


def check_port_free(host: str, port: int) -> None:
    """Fail with a sentence when nothing can serve on ``host:port``; cheap, so call it before
    anything slow loads.

    Given a port, Gradio does not move to another one (it raises "Cannot find empty port" after
    the app is built), and neither do we: the address a person opens, or bookmarked, would show
    whatever holds the port, most often the studio they already started.

    Raises:
        SystemExit: the port is taken, needs privileges, or the address is not this machine's.
    """
    import errno
    import socket

    if not 0 < port < 65536:
        raise SystemExit(f"--port must be between 1 and 65535 (got {port}); the default is 7860.")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError):
        raise SystemExit(
            f"Cannot serve on {host}: it is not an address or host name this machine can resolve. "
            "Use --host 127.0.0.1 (this machine only) or one of this machine's addresses."
        ) from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            s.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise SystemExit(
                    f"Port {port} is already in use on {host}: is Finetune Studio (or another "
                    f"program) already running there? Open http://{_url_host(host)}:{port}, stop that "
                    f"program, or start on another port, e.g. --port {port % 65535 + 1}."
                ) from None
            if exc.errno == errno.EACCES:
                raise SystemExit(
                    f"Port {port} needs administrator rights (ports below 1024 do). Use a port above "
                    "1024, e.g. --port 7860."
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise SystemExit(
                    f"Cannot serve on {host}: it is not an address of this machine. Use --host "
                    "127.0.0.1 (this machine only) or one of this machine's addresses."
                ) from None
            raise SystemExit(f"Cannot serve on {host}:{port} ({exc.strerror or exc}). Try another --port.") from None


def _url_host(host: str) -> str:
    """The address a browser on this machine opens for a bind address (0.0.0.0 is not one)."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    from studio.models import DEFAULT_MODEL  # imports torch: only when the parser is built

    p.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1: this machine only).")
    p.add_argument("--port", type=int, default=8000, help="Port to serve on (default 8000).")
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="Base model: its adapters are served next to it (default: default)."
    )
    p.add_argument(
        "--runs-dir", default=None, help="Folder that holds runs (default ./runs or $FINETUNE_STUDIO_RUNS_DIR)."
    )
    p.add_argument("--max-tokens", type=int, default=2048, help="Largest max_tokens a request may ask for.")
    p.add_argument("--max-batch", type=int, default=8, help="Rows decoded together (default 8).")
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="Requests that may wait for a place in the batch; beyond it the API answers 503 (default 64). "
        "One client (address) may hold half of them before it gets 429.",
    )
    p.add_argument(
        "--prefix-cache-mb",
        type=int,
        default=256,
        help="Memory kept for the K/V of recent prompts, reused by prompts that start alike (default 256; 0: off).",
    )
    add_api_key_arg(p)


def serve_api(args: argparse.Namespace) -> int:
    """Check the bind, load the base, then answer until stopped."""
    api_key = resolve_api_key(args.host, args.api_key)
    if not 1 <= args.max_tokens <= 4096:
        raise SystemExit(f"--max-tokens must be between 1 and 4096 (got {args.max_tokens}).")
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 1)):
        if value < low:
            raise SystemExit(f"{flag} must be at least {low} (got {value}).")
    if args.prefix_cache_mb < 0:
        raise SystemExit(f"--prefix-cache-mb must be 0 (off) or more (got {args.prefix_cache_mb}).")
    refuse_unservable(args.host, args.port, args.runs_dir)

    import uvicorn

    from studio.inference.warmup import preload
    from studio.service import Studio
    from studio.serving.server import create_app, serving_context

    print("Loading libraries...", flush=True)
    preload()
    studio = Studio(args.runs_dir)
    ctx = serving_context(
        studio,
        args.model,
        api_key,
        args.max_tokens,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        prefix_cache_mb=args.prefix_cache_mb,
    )
    models = ctx.catalog.models()
    print(
        f"OpenAI-compatible API on http://{args.host}:{args.port}/v1  ({len(models) - 1} adapters on "
        f"{args.model!r}; runs in {studio.runs_root.resolve()}"
        f"{'; key required' if api_key else ''})",
        flush=True,
    )
    uvicorn.run(create_app(ctx), host=args.host, port=args.port, log_level="warning")
    return 0
