"""Start the web studio: `finetune-studio ui`, `python -m studio ui` and `python app.py` all land here.

Binds 127.0.0.1 by default; any other address refuses to start without --auth.
"""

from __future__ import annotations

import argparse


def serve(args: argparse.Namespace) -> int:
    """Check what can fail in a second, import the heavy libraries, then serve until stopped.

    Raises:
        SystemExit: with one sentence, for an unsafe bind, a busy port or an unusable runs folder.
    """
    from studio.launch import API_KEY_ENV, check_port_free, refuse_unservable, resolve_auth, ui_api_key

    # Everything that can refuse to start does so before anything heavy loads (seconds).
    auth = resolve_auth(args.host, args.auth)
    api_on, api_key = ui_api_key(args.host, args.api_key)
    refuse_unservable(args.host, args.port, args.runs_dir)

    from studio.inference.warmup import preload

    # Handlers must never be the first to import transformers: its lazy imports race when an
    # upload fires several events in a cold process (see studio/inference/warmup.py).
    print("Loading libraries...", flush=True)
    preload()

    from studio.service import Studio
    from studio.ui.app import build_app, launch_kwargs  # gradio is imported here, after the checks

    studio = Studio(args.runs_dir)
    if api_on:
        from studio.serving.server import serving_context

        serving_context(studio, api_key=api_key)
    demo = build_app(studio)
    kwargs = launch_kwargs(studio)
    print(f"Finetune Studio on http://{args.host}:{args.port}  (runs in {studio.runs_root.resolve()})", flush=True)
    print(
        f"OpenAI-compatible API on http://{args.host}:{args.port}/v1"
        if api_on
        else f"The API (/v1) is off: on {args.host} it needs a key (--api-key or ${API_KEY_ENV}).",
        flush=True,
    )
    try:
        demo.queue(default_concurrency_limit=4).launch(
            server_name=args.host, server_port=args.port, auth=auth, **kwargs
        )
    except OSError:
        check_port_free(args.host, args.port)  # taken since the check: say so in a sentence
        raise
    return 0


def main(argv: list[str] | None = None) -> int:
    from studio.launch import add_server_args

    parser = argparse.ArgumentParser(description="Finetune Studio: fine-tune a language model in your browser.")
    add_server_args(parser)
    return serve(parser.parse_args(argv))
