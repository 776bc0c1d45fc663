"""Chat tab: one prompt, the base model and the adapted model side by side, streaming; and the
base-vs-adapter loss on the run's held-out rows (task scores on generated answers live on the
Evaluate tab, studio/ui/eval_tab.py).

Both panes come from one loaded base model: the base pane runs with the adapter disabled.
Picking another run or checkpoint swaps the adapter; the base is not reloaded. Each request
names its adapter, so another browser session switching adapters cannot change a reply.

Handlers are module functions of the ``Studio`` and the tab's components (:class:`ChatTab`):
Send and Regenerate read the same ``{component: value}`` (:attr:`ChatTab.chat_inputs`) and
stream ``{component: new value}``, so tests call them without a browser (tests/test_chat_tab.py).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import gradio as gr

from studio.formatting import markdown_cell
from studio.inference.playground import SamplingSettings, split_ref
from studio.models import ModelError
from studio.service import Studio
from studio.ui.api_panel import build_api_panel
from studio.ui.views import chat_choices

EVAL_HEADERS = ["model", "held-out loss", "perplexity"]
PICK_A_RUN = "Pick a trained run to chat with."


@dataclass
class ChatTab:
    """The Chat tab's components that handlers read or update, by name."""

    run: gr.Dropdown
    refresh: gr.Button
    run_status: gr.Markdown
    system: gr.Textbox
    temperature: gr.Slider
    top_p: gr.Slider
    max_new: gr.Slider
    repetition_penalty: gr.Slider
    seed: gr.Number
    base: gr.Chatbot
    adapted: gr.Chatbot
    message: gr.Textbox
    send: gr.Button
    regenerate: gr.Button
    clear: gr.Button
    eval_table: gr.Dataframe
    eval_samples: gr.Slider
    evaluate: gr.Button
    eval_notes: gr.Markdown

    @property
    def chat_inputs(self) -> set:
        """What Send and Regenerate read: the message, both panes, the run and its settings."""
        return {
            self.message,
            self.base,
            self.adapted,
            self.run,
            self.system,
            self.temperature,
            self.top_p,
            self.max_new,
            self.repetition_penalty,
            self.seed,
        }


def build_chat_tab(studio: Studio) -> ChatTab:
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
    run_status = gr.Markdown(PICK_A_RUN, elem_id="chat-status")
    system = gr.Textbox(label="System prompt (optional, sent to both panes)", lines=1, elem_id="chat-system")
    with gr.Accordion("Sampling (the same for both panes)", open=False):
        with gr.Row():
            temperature = gr.Slider(0, 2, value=0.0, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top-p")
            max_new = gr.Slider(8, 1024, value=128, step=8, label="Max new tokens", elem_id="chat-max-new")
            repetition_penalty = gr.Slider(1.0, 2.0, value=1.0, step=0.05, label="Repetition penalty")
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
    with gr.Accordion("Held-out loss: base vs adapter (task scores on generated answers: the Evaluate tab)", open=True):
        eval_table = gr.Dataframe(headers=EVAL_HEADERS, value=None, interactive=False, elem_id="eval-table")
        with gr.Row():
            eval_samples = gr.Slider(0, 10, value=3, step=1, label="Held-out prompts to answer with both")
            evaluate = gr.Button("Evaluate on held-out rows", elem_id="eval-button")
        eval_notes = gr.Markdown("", elem_id="eval-notes")
    build_api_panel(studio, run)

    tab = ChatTab(
        run=run,
        refresh=refresh,
        run_status=run_status,
        system=system,
        temperature=temperature,
        top_p=top_p,
        max_new=max_new,
        repetition_penalty=repetition_penalty,
        seed=seed,
        base=base,
        adapted=adapted,
        message=message,
        send=send,
        regenerate=regenerate,
        clear=clear,
        eval_table=eval_table,
        eval_samples=eval_samples,
        evaluate=evaluate,
        eval_notes=eval_notes,
    )
    bind = functools.partial  # handlers are module functions of (studio, tab, ...)
    run.change(bind(pick, studio, tab), inputs=run, outputs=[run_status, eval_table, eval_notes])
    refresh.click(bind(refreshed_choices, studio), outputs=run)
    send.click(bind(respond, studio, tab), inputs=tab.chat_inputs, outputs=[message, base, adapted])
    message.submit(bind(respond, studio, tab), inputs=tab.chat_inputs, outputs=[message, base, adapted])
    # The same named inputs as Send; the message box keeps whatever is being typed.
    regenerate.click(bind(regenerate_last, studio, tab), inputs=tab.chat_inputs, outputs=[base, adapted])
    clear.click(bind(cleared, tab), outputs=[base, adapted])
    evaluate.click(bind(run_evaluation, studio, tab), inputs={run, eval_samples}, outputs=[eval_table, eval_notes])
    return tab


# ---- handlers: module functions of the Studio and the tab's components ------------------------


def refreshed_choices(studio: Studio) -> gr.Dropdown:
    """The run list again: runs finish while the page is open."""
    return gr.Dropdown(choices=chat_choices(studio))


def pick(studio: Studio, tab: ChatTab, ref: str | None) -> dict:
    """Load the picked run or checkpoint onto the adapted pane; show its losses and notes."""
    if not ref:
        return {tab.run_status: PICK_A_RUN, tab.eval_table: None, tab.eval_notes: ""}
    try:
        r, warnings = studio.activate_run(ref)
    except (LookupError, ValueError, ModelError) as exc:
        return {tab.run_status: f"**Can't load this adapter.** {exc}", tab.eval_table: None, tab.eval_notes: ""}
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
        return {
            tab.run_status: "  \n".join(lines),
            tab.eval_table: None,
            tab.eval_notes: "This is an intermediate checkpoint: *Evaluate* scores it against "
            "the base (the result is shown, not stored with the run).",
        }
    evaluation = r.evaluation()
    return {
        tab.run_status: "  \n".join(lines),
        tab.eval_table: _stored_table(studio, r.id),
        tab.eval_notes: _samples_markdown(evaluation)
        if evaluation
        else "Losses recorded during training. *Evaluate* scores both again and answers held-out prompts.",
    }


def respond(studio: Studio, tab: ChatTab, data: dict):
    """Send: both panes get the message and stream their replies; the message box empties."""
    for panes in _answer(studio, tab, data, data[tab.message], data[tab.base], data[tab.adapted]):
        yield {tab.message: "", **panes}


def regenerate_last(studio: Studio, tab: ChatTab, data: dict):
    """Regenerate: drop both panes' last exchange and ask the same question again, with the same
    inputs Send reads (the message box is left alone)."""
    base_hist, text = _strip_last_turn(data[tab.base])
    adapted_hist, _ = _strip_last_turn(data[tab.adapted])
    if not text:
        gr.Warning("Nothing to regenerate yet; send a message first.")
        return
    yield from _answer(studio, tab, data, text, base_hist, adapted_hist)


def cleared(tab: ChatTab) -> dict:
    return {tab.base: [], tab.adapted: []}


def run_evaluation(studio: Studio, tab: ChatTab, data: dict, progress=gr.Progress()) -> dict:
    """Score base and adapter on the held-out rows and answer some of them with both."""
    ref = data[tab.run]
    if not ref:
        gr.Warning("Pick a trained run first.")
        return {tab.eval_table: gr.skip(), tab.eval_notes: gr.skip()}
    try:
        result = studio.evaluate(
            ref, samples=int(data[tab.eval_samples]), progress=lambda msg: progress(None, desc=msg)
        )
    except (LookupError, ValueError, ModelError) as exc:
        return {tab.eval_table: gr.skip(), tab.eval_notes: f"**Can't evaluate.** {exc}"}
    from studio.evaluation import heldout

    rows = heldout.table_rows(studio.run(split_ref(ref)[0]), result)
    return {tab.eval_table: rows, tab.eval_notes: _samples_markdown(result)}


# ---- helpers ----------------------------------------------------------------------------------


def _answer(studio: Studio, tab: ChatTab, data: dict, text, base_hist, adapted_hist):
    """Stream ``{base: history, adapted: history}`` as both panes answer ``text``; a warning
    (and nothing streamed) when there is nothing to ask, no run, or a setting out of range."""
    text = (text or "").strip()
    if not text:
        return
    ref = data[tab.run]
    if not ref:
        gr.Warning("Pick a trained run first.")
        return
    base_hist = list(base_hist or []) + [{"role": "user", "content": text}]
    adapted_hist = list(adapted_hist or []) + [{"role": "user", "content": text}]
    settings = SamplingSettings(
        max_new_tokens=int(data[tab.max_new]),
        temperature=float(data[tab.temperature]),
        top_p=float(data[tab.top_p]),
        repetition_penalty=float(data[tab.repetition_penalty]),
        seed=int(data[tab.seed] or 0),
    )
    problems = settings.problems()
    if problems:
        gr.Warning(" ".join(problems))
        return

    def panes(b: str, a: str) -> dict:
        return {
            tab.base: base_hist + [{"role": "assistant", "content": b}],
            tab.adapted: adapted_hist + [{"role": "assistant", "content": a}],
        }

    yield panes("", "")
    system = data[tab.system]
    try:
        for b, a in studio.chat(_messages(base_hist, system), _messages(adapted_hist, system), settings, ref):
            yield panes(b, a)
    except (LookupError, ValueError, ModelError) as exc:
        gr.Warning(str(exc))


def _stored_table(studio: Studio, run_id: str | None):
    from studio.evaluation import heldout

    rows = heldout.table_rows(studio.run(run_id)) if run_id else []
    return rows or None


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
