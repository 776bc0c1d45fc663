"""Server flags shared by `python app.py` and `finetune-studio ui`, and the bind-safety check."""

from __future__ import annotations

import argparse
import ipaddress
import os

AUTH_ENV = "FINETUNE_STUDIO_AUTH"


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1: this machine only).")
    p.add_argument("--port", type=int, default=7860, help="Port to serve on (default 7860).")
    p.add_argument("--auth", default=None,
                   help=f"user:pass required to open the page; also read from ${AUTH_ENV}. "
                        "Required when --host is not a loopback address.")
    p.add_argument("--runs-dir", default=None, help="Folder that holds runs (default ./runs or $FINETUNE_STUDIO_RUNS_DIR).")


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
        raise SystemExit(f"Refusing to serve on {host} without a password: anyone who can reach it could "
                         f"train and read your data. Add --auth user:password (or set ${AUTH_ENV}).")
    return None
