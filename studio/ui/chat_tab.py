"""Chat tab: one prompt, the base model and the adapted model side by side, streaming.

Both panes come from one loaded base model: the base pane runs with the adapter disabled.
Picking another run swaps the adapter; the base is not reloaded.
"""

from __future__ import annotations

import gradio as gr

from studio.models import ModelError
from studio.playground import SamplingSettings
from studio.service import Studio


def _text(content) -> str:
    """Gradio 6 hands Chatbot contents back as a list of parts; flatten to plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    if isinstance(content, dict):
        return content.get("text", "")
    return str(content or "")


def _messages(history: list[dict], system: str | None) -> list[dict[str, str]]:
    system = (system or "").strip()  # components in a closed accordion can arrive as None
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": m["role"], "content": _text(m["content"])} for m in history]


def run_choices(studio: Studio) -> list[tuple[str, str]]:
    return [(studio.run_label(r), r.id) for r in studio.trained_runs()]


def build_chat_tab(studio: Studio) -> gr.Dropdown:
    with gr.Row():
        run = gr.Dropdown(choices=run_choices(studio), value=None, label="Trained run", elem_id="chat-run",
                          scale=3, info="The adapted pane uses this run; the base pane the same model without it.")
        refresh = gr.Button("Refresh list", scale=1)
    run_status = gr.Markdown("Pick a trained run to chat with.", elem_id="chat-status")
    with gr.Accordion("Sampling (the same for both panes)", open=False):
        with gr.Row():
            temperature = gr.Slider(0, 2, value=0.0, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top-p")
            max_new = gr.Slider(8, 1024, value=128, step=8, label="Max new tokens")
            rep = gr.Slider(1.0, 2.0, value=1.0, step=0.05, label="Repetition penalty")
            seed = gr.Number(value=0, precision=0, label="Seed")
        system = gr.Textbox(label="System prompt (optional)", lines=2)
    with gr.Row():
        base = gr.Chatbot(label="Base model", elem_id="chat-base", height=380)
        adapted = gr.Chatbot(label="Adapted model", elem_id="chat-adapted", height=380)
    with gr.Row():
        message = gr.Textbox(placeholder="Ask both models the same thing...", show_label=False,
                             elem_id="chat-input", scale=5)
        send = gr.Button("Send", variant="primary", elem_id="chat-send", scale=1)
        clear = gr.Button("Clear", scale=1)

    def pick(run_id):
        if not run_id:
            return "Pick a trained run to chat with."
        try:
            r = studio.activate_run(run_id)
        except (LookupError, ValueError, ModelError) as exc:
            return f"**Can't load this run.** {exc}"
        cfg = r.config()
        return (f"Adapted pane: run `{r.id}` ({cfg.method} on `{cfg.model}`). Base pane: the same "
                f"loaded model with the adapter disabled.")

    def respond(text, base_hist, adapted_hist, run_id, temp, p, n, penalty, sd, sys_prompt):
        text = (text or "").strip()
        if not text:
            return
        if not run_id:
            gr.Warning("Pick a trained run first.")
            return
        if studio.playground.active != run_id:
            pick(run_id)
        base_hist = list(base_hist or []) + [{"role": "user", "content": text}]
        adapted_hist = list(adapted_hist or []) + [{"role": "user", "content": text}]
        settings = SamplingSettings(max_new_tokens=int(n), temperature=float(temp), top_p=float(p),
                                    repetition_penalty=float(penalty), seed=int(sd or 0))
        stream = studio.chat(_messages(base_hist, sys_prompt), _messages(adapted_hist, sys_prompt), settings)
        b = a = ""
        yield "", base_hist + [{"role": "assistant", "content": ""}], adapted_hist + [{"role": "assistant", "content": ""}]
        for b, a in stream:
            yield "", base_hist + [{"role": "assistant", "content": b}], adapted_hist + [{"role": "assistant", "content": a}]

    inputs = [message, base, adapted, run, temperature, top_p, max_new, rep, seed, system]
    run.change(pick, inputs=run, outputs=run_status)
    refresh.click(lambda: gr.Dropdown(choices=run_choices(studio)), outputs=run)
    send.click(respond, inputs=inputs, outputs=[message, base, adapted])
    message.submit(respond, inputs=inputs, outputs=[message, base, adapted])
    clear.click(lambda: ([], []), outputs=[base, adapted])
    return run
