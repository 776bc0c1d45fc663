"""Data tab: upload (or pick a sample), fix the column mapping, read the report, see the token
lengths and exactly what the model will be trained on."""

from __future__ import annotations

import html
import importlib.resources
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from studio.data import DataError
from studio.data.detect import ROLES
from studio.models import ModelError
from studio.service import DatasetView, Studio
from studio.ui.plots import length_histogram
from studio.ui.views import report_markdown

SAMPLES = importlib.resources.files("studio") / "templates" / "samples"  # package data
SAMPLE_FILES = {"instructions": "instructions.csv", "chat": "chat.jsonl", "text": "text.csv"}
NONE = "(none)"
ROLE_LABELS = {
    "prompt": "Prompt / instruction",
    "input": "Input (optional)",
    "response": "Response / output",
    "system": "System (optional)",
    "messages": "Chat messages",
    "text": "Plain text",
}
EMPTY_REPORT = "No dataset yet. Upload a file or start from a sample."


@dataclass
class DataTab:
    """The Data tab's components; events are wired by :func:`wire_data_tab` once the Train tab's
    model and max-length controls exist (validation counts tokens with them)."""

    upload: gr.File
    samples: dict[str, gr.Button]
    roles: dict[str, gr.Dropdown]
    report: gr.Markdown
    histogram: gr.Plot
    seen: gr.HTML
    seen_prev: gr.Button
    seen_next: gr.Button
    preview: gr.Dataframe
    view: gr.State
    seen_index: gr.State


def build_data_tab() -> DataTab:
    gr.Markdown(
        "Upload a **CSV** (or TSV, JSONL, JSON, Parquet) with `instruction,output` (optional "
        "`input`), `prompt,completion` (or `question,answer`...), chat `messages`, or `text`."
    )
    with gr.Row():
        upload = gr.File(
            label="Dataset file",
            elem_id="data-upload",
            file_count="single",
            file_types=[".csv", ".tsv", ".jsonl", ".json", ".parquet"],
            scale=3,
        )
        with gr.Column(scale=1):
            gr.Markdown("**Or start from a sample**")
            samples = {
                "instructions": gr.Button("Instructions (Q&A format)", elem_id="data-sample-instructions", size="sm"),
                "chat": gr.Button("Chat (answers in French)", elem_id="data-sample-chat", size="sm"),
                "text": gr.Button("Plain text (log notes)", elem_id="data-sample-text", size="sm"),
            }
    with gr.Accordion("Column mapping (detected; change it if it is wrong)", open=True, elem_id="data-mapping"):
        with gr.Row():
            roles = {
                r: gr.Dropdown(
                    [NONE], value=NONE, label=ROLE_LABELS[r], elem_id=f"data-map-{r}", interactive=True, min_width=140
                )
                for r in ROLES
            }
    report = gr.Markdown(EMPTY_REPORT, elem_id="data-report")
    with gr.Row():
        histogram = gr.Plot(elem_id="data-histogram", label="Token lengths")
        with gr.Column():
            gr.Markdown(
                "**What the model will see** · <span class='fs-trained'>trained on</span> · "
                "<span class='fs-masked'>prompt (not trained on)</span> · "
                "<span class='fs-cut'>cut by max length</span>"
            )
            seen = gr.HTML("", elem_id="data-seen")
            with gr.Row():
                seen_prev = gr.Button("Previous row", size="sm", elem_id="data-seen-prev")
                seen_next = gr.Button("Next row", size="sm", elem_id="data-seen-next")
    preview = gr.Dataframe(
        label="The file's first rows", elem_id="data-preview", interactive=False, wrap=True, max_height=360
    )
    return DataTab(
        upload, samples, roles, report, histogram, seen, seen_prev, seen_next, preview, gr.State(None), gr.State(0)
    )


def seen_html(view: DatasetView | None, index: int) -> str:
    """The rendered row with trained, masked and cut tokens marked. Every piece of text is
    escaped: a cell holding HTML must show as text, never run."""
    if view is None or not view.usable():
        return "<div class='fs-seen fs-empty'>No usable rows to show.</div>"
    parts, marked_cut = [], False
    for seg in view.segments(index):
        if seg.cut and not marked_cut:
            parts.append("<span class='fs-cut-mark'>✂ max length</span>")
            marked_cut = True
        cls = "fs-cut" if seg.cut else ("fs-trained" if seg.trained else "fs-masked")
        parts.append(f"<span class='{cls}'>{html.escape(seg.text)}</span>")
    n = len(view.usable())
    return (
        f"<div class='fs-seen-head'>Usable row {index % n + 1} of {n}</div><pre class='fs-seen'>{''.join(parts)}</pre>"
    )


def wire_data_tab(
    studio: Studio, tab: DataTab, dataset_path: gr.State, mapping: gr.State, model: gr.Textbox, max_length: gr.Number
) -> None:
    role_boxes = [tab.roles[r] for r in ROLES]
    outputs = [
        dataset_path,
        mapping,
        tab.view,
        tab.seen_index,
        tab.report,
        tab.histogram,
        tab.seen,
        tab.preview,
        *role_boxes,
    ]

    def nothing_shown(path: str | None, pairs: str, report: str) -> tuple:
        """The tab with no rows to show: only the report's sentence (the file and mapping kept)."""
        blank_roles = [gr.Dropdown(choices=[NONE], value=NONE) for _ in ROLES]
        return (path, pairs, None, 0, report, None, "", pd.DataFrame(), *blank_roles)

    def render(path: str | None, pairs: str, model_ref: str, max_len) -> tuple:
        """Everything the tab shows for a dataset and mapping (the one place that builds it).
        ``pairs`` is the person's own mapping ("" = detect); only that goes into the config."""
        if not path:
            return nothing_shown(None, "", EMPTY_REPORT)
        try:
            view = studio.inspect_dataset(path, pairs, (model_ref or "default").strip(), int(max_len or 512))
        except DataError as exc:
            return nothing_shown(None, "", f"**Can't use this file.** {exc}")
        except ModelError as exc:  # the file is fine: keep it, so fixing the model brings the report back
            return nothing_shown(
                path,
                pairs,
                f"**Can't count tokens: the model cannot be loaded.** {exc} Change "
                "**Model** on the Train tab; this report updates when you leave that box.",
            )
        choices = [NONE, *view.columns]
        if view.report is None:  # readable, but no mapping works yet: keep what the person chose so far
            chosen = {role: col for col, _, role in (p.rpartition("=") for p in pairs.split(",") if "=" in p)}
            return (
                path,
                "",
                view,
                0,
                f"**Can't use these columns yet.** {view.problem}",
                None,
                "",
                view.preview,
                *[gr.Dropdown(choices=choices, value=chosen.get(r, NONE)) for r in ROLES],
            )
        roles = view.report.mapping.roles()
        stats = view.report.stats
        hist = length_histogram(stats.lengths.tolist(), stats.max_length) if stats else None
        return (
            path,
            pairs,
            view,
            0,
            report_markdown(view.report),
            hist,
            seen_html(view, 0),
            view.preview,
            *[gr.Dropdown(choices=choices, value=roles.get(r, NONE)) for r in ROLES],
        )

    def uploaded(file, model_ref, max_len):
        if not file:
            return render(None, "", model_ref, max_len)
        try:
            path = studio.import_dataset(file)
        except DataError as exc:
            return nothing_shown(None, "", f"**Can't use this file.** {exc}")
        return render(path, "", model_ref, max_len)

    def remapped(path, model_ref, max_len, *values):
        pairs = ",".join(f"{col}={role}" for role, col in zip(ROLES, values) if col and col != NONE)
        return render(path, pairs, model_ref, max_len)

    def step(view, index, delta):
        return index + delta, seen_html(view, index + delta)

    settings = [model, max_length]
    tab.upload.upload(uploaded, inputs=[tab.upload, *settings], outputs=outputs)
    tab.upload.clear(lambda m, n: render(None, "", m, n), inputs=settings, outputs=outputs)
    for kind, button in tab.samples.items():
        sample = str(SAMPLES / SAMPLE_FILES[kind])
        button.click(lambda m, n, s=sample: render(s, "", m, n), inputs=settings, outputs=outputs)
    for box in role_boxes:  # .input, not .change: programmatic updates must not re-trigger
        box.input(remapped, inputs=[dataset_path, *settings, *role_boxes], outputs=outputs)
    # Token counts depend on the model's tokenizer and the max length chosen on the Train tab.
    for control in settings:
        control.blur(render, inputs=[dataset_path, mapping, *settings], outputs=outputs)
    tab.seen_prev.click(
        lambda v, i: step(v, i, -1), inputs=[tab.view, tab.seen_index], outputs=[tab.seen_index, tab.seen]
    )
    tab.seen_next.click(
        lambda v, i: step(v, i, 1), inputs=[tab.view, tab.seen_index], outputs=[tab.seen_index, tab.seen]
    )
