"""Under the Chat tab: the selected adapter through the OpenAI-compatible API (copyable Python and
curl that work against this server), and the API's usage per adapter."""

from __future__ import annotations

import json

import gradio as gr
import pandas as pd

from studio.launch import API_KEY_ENV
from studio.service import Studio

USAGE_COLUMNS = ["model", "requests", "errors", "tokens in", "tokens out", "mean queue ms", "mean first token ms"]
EXAMPLE = "Hello! What can you do?"


def python_snippet(base_url: str, model: str, key_required: bool) -> str:
    key = f'os.environ["{API_KEY_ENV}"]' if key_required else '"not-needed-on-localhost"'
    return (
        "import os\n\n"
        "from openai import OpenAI  # pip install openai\n\n"
        f'client = OpenAI(base_url="{base_url}", api_key={key})\n'
        "reply = client.chat.completions.create(\n"
        f"    model={json.dumps(model)},\n"
        f'    messages=[{{"role": "user", "content": {json.dumps(EXAMPLE)}}}],\n'
        "    max_tokens=64,\n"
        ")\n"
        "print(reply.choices[0].message.content)\n"
    )


def curl_snippet(base_url: str, model: str, key_required: bool) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": EXAMPLE}], "max_tokens": 64}
    auth = f' \\\n  -H "Authorization: Bearer ${API_KEY_ENV}"' if key_required else ""
    return (
        f"curl {base_url}/chat/completions \\\n  -H 'Content-Type: application/json'{auth} \\\n"
        f"  -d '{json.dumps(body)}'"
    )


def usage_frame(studio: Studio) -> pd.DataFrame:
    rows = []
    stats = studio.serving.stats.snapshot() if studio.serving is not None else {}
    for model, s in sorted(stats.items()):
        rows.append(
            [
                model,
                s.requests,
                s.errors,
                s.prompt_tokens,
                s.completion_tokens,
                round(1000 * s.queue_s / max(s.requests, 1)),
                round(1000 * s.ttft_s / s.ttft_count) if s.ttft_count else None,
            ]
        )
    return pd.DataFrame(rows, columns=USAGE_COLUMNS)


def snippets(studio: Studio, ref: str | None, request: gr.Request | None = None):
    """(python, curl, note) for the picked run on this server's address."""
    if not ref:
        return "", "", "Pick a trained run above to get code that calls it."
    if studio.serving is None:
        return (
            "",
            "",
            (
                f"The API is off on this server: it binds beyond this machine without a key. Restart with "
                f"`--api-key KEY` (or set ${API_KEY_ENV}) to call adapters from code."
            ),
        )
    host = (request.headers.get("host") if request is not None else None) or "127.0.0.1:7860"
    base_url = f"http://{host}/v1"
    keyed = studio.serving.api_key is not None
    note = (
        f"Each request picks its adapter with `model`; the base is `{studio.serving.catalog.base}`. "
        "Requests sent together are answered in one batch."
        + (f" Set ${API_KEY_ENV} to the key this server was started with." if keyed else "")
    )
    return python_snippet(base_url, ref, keyed), curl_snippet(base_url, ref, keyed), note


def build_api_panel(studio: Studio, run: gr.Dropdown) -> None:
    with gr.Accordion("Call it from code: the OpenAI-compatible API", open=False, elem_id="api-panel"):
        note = gr.Markdown("Pick a trained run above to get code that calls it.", elem_id="api-note")
        python = gr.Code(language="python", elem_id="api-python", interactive=False, label="Python (openai)")
        curl = gr.Code(language="shell", elem_id="api-curl", interactive=False, label="curl")
        usage = gr.Dataframe(usage_frame(studio), elem_id="api-usage", interactive=False, label="API usage")
        refresh = gr.Button("Refresh usage", size="sm", elem_id="api-usage-refresh")

    def show(ref, request: gr.Request):
        return snippets(studio, ref, request)

    run.change(show, inputs=run, outputs=[python, curl, note])
    refresh.click(lambda: usage_frame(studio), outputs=usage)
