"""Chat tab: one prompt, the base model and the adapted model side by side, streaming; and the
base-vs-adapter evaluation on the run's held-out rows.

Both panes come from one loaded base model: the base pane runs with the adapter disabled.
Picking another run or checkpoint swaps the adapter; the base is not reloaded. Each request
names its adapter, so another browser session switching adapters cannot change a reply.
"""

from __future__ import annotations

import re

import gradio as gr

from studio.formatting import markdown_cell
from studio.inference.playground import SamplingSettings, split_ref
from studio.models import ModelError
from studio.service import Studio
from studio.ui.api_panel import build_api_panel
from studio.ui.views import chat_choices


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


def _strip_last_turn(history: list[dict]) -> tuple[list[dict], str]:
    """History without its last exchange, and that exchange's user text (for Regenerate)."""
    history = list(history or [])
    while history and history[-1]["role"] == "assistant":
        history.pop()
    text = _text(history.pop()["content"]) if history and history[-1]["role"] == "user" else ""
    return history, text


def _samples_markdown(result: dict) -> str:
    parts = [f"Scored {result['rows']} held-out rows ({result['tokens']:,} answer tokens) in {result['seconds']:.1f}s."]
    for i, s in enumerate(result.get("samples", []), 1):
        prompt = s["prompt"].strip()[-600:]
        parts.append(
            f"**Held-out prompt {i}**\n\n{_fenced(prompt)}\n\n"
            f"| expected | base | adapter |\n|---|---|---|\n"
            f"| {_cell(s['reference'])} | {_cell(s['base'])} | {_cell(s['adapter'])} |"
        )
    return "\n\n".join(parts)


def _fenced(text: str) -> str:
    """A code block that the text cannot close early: the fence is longer than any backtick run in it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _cell(text: str) -> str:
    return markdown_cell(text, limit=800, multiline=True, empty="(empty)")


EVAL_HEADERS = ["model", "held-out loss", "perplexity"]


def build_chat_tab(studio: Studio) -> gr.Dropdown:
    with gr.Row():
        run = gr.Dropdown(
            choices=chat_choices(studio),
            value=None,
            label="Trained run or checkpoint",
            elem_id="chat-run",
            scale=3,
            info="The adapted pane uses this adapter; the base pane the same loaded model without it.",
        )
        refresh = gr.Button("Refresh list", scale=1)
    run_status = gr.Markdown("Pick a trained run to chat with.", elem_id="chat-status")
    system = gr.Textbox(label="System prompt (optional, sent to both panes)", lines=1, elem_id="chat-system")
    with gr.Accordion("Sampling (the same for both panes)", open=False):
        with gr.Row():
            temperature = gr.Slider(0, 2, value=0.0, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top-p")
            max_new = gr.Slider(8, 1024, value=128, step=8, label="Max new tokens", elem_id="chat-max-new")
            rep = gr.Slider(1.0, 2.0, value=1.0, step=0.05, label="Repetition penalty")
            seed = gr.Number(value=0, precision=0, label="Seed")
    with gr.Row():
        base = gr.Chatbot(label="Base model", elem_id="chat-base", height=380)
        adapted = gr.Chatbot(label="Adapted model", elem_id="chat-adapted", height=380)
    with gr.Row():
        message = gr.Textbox(
            placeholder="Ask both models the same thing...", show_label=False, elem_id="chat-input", scale=5
        )
        send = gr.Button("Send", variant="primary", elem_id="chat-send", scale=1)
        regenerate = gr.Button("Regenerate", elem_id="chat-regenerate", scale=1)
        clear = gr.Button("Clear", elem_id="chat-clear", scale=1)
    with gr.Accordion("Evaluation: base vs adapter on the held-out rows", open=True):
        eval_table = gr.Dataframe(headers=EVAL_HEADERS, value=None, interactive=False, elem_id="eval-table")
        with gr.Row():
            samples = gr.Slider(0, 10, value=3, step=1, label="Held-out prompts to answer with both")
            evaluate = gr.Button("Evaluate on held-out rows", elem_id="eval-button")
        eval_notes = gr.Markdown("", elem_id="eval-notes")
    build_api_panel(studio, run)

    def stored_table(run_id):
        from studio.evaluation import heldout

        rows = heldout.table_rows(studio.run(run_id)) if run_id else []
        return rows or None

    def pick(ref):
        if not ref:
            return "Pick a trained run to chat with.", None, ""
        try:
            r, warnings = studio.activate_run(ref)
        except (LookupError, ValueError, ModelError) as exc:
            return f"**Can't load this adapter.** {exc}", None, ""
        cfg = r.config()
        loaded, load_s = studio.playground_stats()
        lines = [
            f"Adapted pane: `{ref}` ({cfg.method} on `{cfg.model}`), ready in "
            f"{(load_s or 0) * 1000:.0f} ms ({loaded} adapter{'s' if loaded != 1 else ''} "
            "kept loaded). Base pane: the same loaded model with the adapter disabled."
        ]
        lines += [f"**Warning:** {w}" for w in warnings]
        note = studio.chat_memory_note()
        if note:
            lines.append(note)
        if split_ref(ref)[1]:
            return (
                "  \n".join(lines),
                None,
                "This is an intermediate checkpoint: *Evaluate* scores it against "
                "the base (the result is shown, not stored with the run).",
            )
        evaluation = r.evaluation()
        return (
            "  \n".join(lines),
            stored_table(r.id),
            _samples_markdown(evaluation)
            if evaluation
            else ("Losses recorded during training. *Evaluate* scores both again and answers held-out prompts."),
        )

    def respond(text, base_hist, adapted_hist, ref, temp, p, n, penalty, sd, sys_prompt):
        text = (text or "").strip()
        if not text:
            return
        if not ref:
            gr.Warning("Pick a trained run first.")
            return
        base_hist = list(base_hist or []) + [{"role": "user", "content": text}]
        adapted_hist = list(adapted_hist or []) + [{"role": "user", "content": text}]
        settings = SamplingSettings(
            max_new_tokens=int(n),
            temperature=float(temp),
            top_p=float(p),
            repetition_penalty=float(penalty),
            seed=int(sd or 0),
        )
        problems = settings.problems()
        if problems:
            gr.Warning(" ".join(problems))
            return
        yield (
            "",
            base_hist + [{"role": "assistant", "content": ""}],
            adapted_hist + [{"role": "assistant", "content": ""}],
        )
        try:
            for b, a in studio.chat(
                _messages(base_hist, sys_prompt), _messages(adapted_hist, sys_prompt), settings, ref
            ):
                yield (
                    "",
                    base_hist + [{"role": "assistant", "content": b}],
                    adapted_hist + [{"role": "assistant", "content": a}],
                )
        except (LookupError, ValueError, ModelError) as exc:
            gr.Warning(str(exc))

    def redo(base_hist, adapted_hist, *rest):
        """Drop both panes' last exchange and ask the same question again."""
        base_hist, text = _strip_last_turn(base_hist)
        adapted_hist, _ = _strip_last_turn(adapted_hist)
        if not text:
            gr.Warning("Nothing to regenerate yet; send a message first.")
            return
        for _, b, a in respond(text, base_hist, adapted_hist, *rest):
            yield b, a  # the message box keeps whatever is being typed

    def run_eval(ref, n, progress=gr.Progress()):
        if not ref:
            gr.Warning("Pick a trained run first.")
            return gr.skip(), gr.skip()
        try:
            result = studio.evaluate(ref, samples=int(n), progress=lambda msg: progress(None, desc=msg))
        except (LookupError, ValueError, ModelError) as exc:
            return gr.skip(), f"**Can't evaluate.** {exc}"
        from studio.evaluation import heldout

        rows = heldout.table_rows(studio.run(split_ref(ref)[0]), result)
        return rows, _samples_markdown(result)

    inputs = [message, base, adapted, run, temperature, top_p, max_new, rep, seed, system]
    run.change(pick, inputs=run, outputs=[run_status, eval_table, eval_notes])
    refresh.click(lambda: gr.Dropdown(choices=chat_choices(studio)), outputs=run)
    send.click(respond, inputs=inputs, outputs=[message, base, adapted])
    message.submit(respond, inputs=inputs, outputs=[message, base, adapted])
    regenerate.click(
        redo, inputs=[base, adapted, run, temperature, top_p, max_new, rep, seed, system], outputs=[base, adapted]
    )
    clear.click(lambda: ([], []), outputs=[base, adapted])
    evaluate.click(run_eval, inputs=[run, samples], outputs=[eval_table, eval_notes])
    return run
