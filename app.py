"""Start the Finetune Studio web app.

    python app.py [--host 127.0.0.1] [--port 7860] [--auth user:pass] [--runs-dir DIR]

Binds 127.0.0.1 by default; any other address refuses to start without --auth.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network here, and no tracking


def serve(args: argparse.Namespace) -> int:
    from studio.server_args import resolve_auth

    auth = resolve_auth(args.host, args.auth)  # refuse an unsafe bind before loading anything heavy

    from studio.service import Studio
    from studio.ui import build_app, launch_kwargs

    studio = Studio(args.runs_dir)
    demo = build_app(studio)
    print(f"Finetune Studio on http://{args.host}:{args.port}  (runs in {studio.registry.root.resolve()})", flush=True)
    demo.queue(default_concurrency_limit=4).launch(
        server_name=args.host, server_port=args.port, auth=auth, **launch_kwargs(studio))
    return 0


def main(argv: list[str] | None = None) -> int:
    from studio.server_args import add_server_args

    parser = argparse.ArgumentParser(description="Finetune Studio: fine-tune a language model in your browser.")
    add_server_args(parser)
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
