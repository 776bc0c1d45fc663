"""Data tab: upload (or pick a sample), fix the column mapping, read the report, see the token
lengths and exactly what the model will be trained on.

Handlers are module functions of the ``Studio`` and the tab's components (:class:`DataTab`):
they read an event's ``{component: value}`` and return ``{component: new value}``, so tests call
them without a browser (tests/test_data_tab.py).
"""

from __future__ import annotations

import functools
import html
import importlib.resources
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from studio.data import DataError
from studio.data.detect import PREFERENCE_ROLES, ROLES
from studio.models import ModelError
from studio.service import DatasetView, Studio
from studio.ui.plots import length_histogram
from studio.ui.views import report_markdown

SAMPLES = importlib.resources.files("studio") / "templates" / "samples"  # package data
SAMPLE_FILES = {
    "instructions": "instructions.csv",
    "chat": "chat.jsonl",
    "text": "text.csv",
    "preferences": "preferences.csv",
}
NONE = "(none)"
ROLE_LABELS = {
    "prompt": "Prompt / instruction",
    "input": "Input (optional)",
    "response": "Response / output",
    "system": "System (optional)",
    "messages": "Chat messages",
    "text": "Plain text",
    "chosen": "Chosen answer (preference)",
    "rejected": "Rejected answer (preference)",
    "label": "Good / bad label (feedback)",
}
EMPTY_REPORT = "No dataset yet. Upload a file or start from a sample."


@dataclass
class DataTab:
    """The Data tab's components that handlers read or update, by name.

    ``dataset_path`` and ``mapping`` are the page's per-browser-tab state that the Train tab
    reads too; ``model`` and ``max_length`` are the Train tab's controls (tokens are counted
    with them), set by :func:`wire_data_tab` once that tab exists."""

    dataset_path: gr.State
    mapping: gr.State
    upload: gr.File
    samples: dict[str, gr.Button]
    roles: dict[str, gr.Dropdown]  # by role, in ROLES order
    report: gr.Markdown
    histogram: gr.Plot
    seen: gr.HTML
    seen_prev: gr.Button
    seen_next: gr.Button
    preview: gr.Dataframe
    view: gr.State
    seen_index: gr.State
    model: gr.Textbox | None = None
    max_length: gr.Number | None = None

    @property
    def settings(self) -> set:
        """The Train tab's controls that validation counts tokens with."""
        return {self.model, self.max_length}

    @property
    def outputs(self) -> list:
        """Everything a new dataset or mapping redraws."""
        return [
            self.dataset_path,
            self.mapping,
            self.view,
            self.seen_index,
            self.report,
            self.histogram,
            self.seen,
            self.preview,
            *self.roles.values(),
        ]


def build_data_tab(dataset_path: gr.State, mapping: gr.State) -> DataTab:
    """The tab's components; its events are wired by :func:`wire_data_tab` once the Train tab's
    model and max-length controls exist."""
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
                "preferences": gr.Button(
                    "Preference pairs (chosen vs rejected)", elem_id="data-sample-preferences", size="sm"
                ),
            }
    with gr.Accordion("Column mapping (detected; change it if it is wrong)", open=True, elem_id="data-mapping"):
        with gr.Row():
            roles = {
                r: gr.Dropdown(
                    [NONE], value=NONE, label=ROLE_LABELS[r], elem_id=f"data-map-{r}", interactive=True, min_width=140
                )
                for r in ROLES + PREFERENCE_ROLES
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
        dataset_path=dataset_path,
        mapping=mapping,
        upload=upload,
        samples=samples,
        roles=roles,
        report=report,
        histogram=histogram,
        seen=seen,
        seen_prev=seen_prev,
        seen_next=seen_next,
        preview=preview,
        view=gr.State(None),
        seen_index=gr.State(0),
    )


def wire_data_tab(studio: Studio, tab: DataTab, model: gr.Textbox, max_length: gr.Number) -> None:
    """Bind the tab's events; ``model`` and ``max_length`` are the Train tab's controls."""
    tab.model, tab.max_length = model, max_length
    bind = functools.partial  # handlers are module functions of (studio, tab, ...)
    outputs = tab.outputs
    tab.upload.upload(bind(uploaded, studio, tab), inputs={tab.upload, *tab.settings}, outputs=outputs)
    tab.upload.clear(bind(cleared, studio, tab), inputs=tab.settings, outputs=outputs)
    for kind, button in tab.samples.items():
        button.click(bind(load_sample, studio, tab, kind), inputs=tab.settings, outputs=outputs)
    for box in tab.roles.values():  # .input, not .change: programmatic updates must not re-trigger
        box.input(
            bind(remapped, studio, tab),
            inputs={tab.dataset_path, *tab.settings, *tab.roles.values()},
            outputs=outputs,
        )
    # Token counts depend on the model's tokenizer and the max length chosen on the Train tab.
    for control in (model, max_length):
        control.blur(
            bind(settings_changed, studio, tab),
            inputs={tab.dataset_path, tab.mapping, *tab.settings},
            outputs=outputs,
        )
    tab.seen_prev.click(bind(step_seen, tab, -1), inputs={tab.view, tab.seen_index}, outputs=[tab.seen_index, tab.seen])
    tab.seen_next.click(bind(step_seen, tab, 1), inputs={tab.view, tab.seen_index}, outputs=[tab.seen_index, tab.seen])


# ---- handlers: module functions of the Studio and the tab's components ------------------------


def uploaded(studio: Studio, tab: DataTab, data: dict) -> dict:
    """A file was dropped: copy it next to the runs and show it, or say why it cannot be used."""
    file = data[tab.upload]
    if not file:
        return render(studio, tab, None, "", data[tab.model], data[tab.max_length])
    try:
        path = studio.import_dataset(file)
    except DataError as exc:
        return nothing_shown(tab, None, "", f"**Can't use this file.** {exc}")
    return render(studio, tab, path, "", data[tab.model], data[tab.max_length])


def cleared(studio: Studio, tab: DataTab, data: dict) -> dict:
    return render(studio, tab, None, "", data[tab.model], data[tab.max_length])


def load_sample(studio: Studio, tab: DataTab, kind: str, data: dict) -> dict:
    """One of the bundled samples (``SAMPLE_FILES``), read from the package."""
    return render(studio, tab, str(SAMPLES / SAMPLE_FILES[kind]), "", data[tab.model], data[tab.max_length])


def remapped(studio: Studio, tab: DataTab, data: dict) -> dict:
    """The person changed a role's column: validate again with their mapping."""
    chosen = ((role, data[box]) for role, box in tab.roles.items())
    pairs = ",".join(f"{col}={role}" for role, col in chosen if col and col != NONE)
    return render(studio, tab, data[tab.dataset_path], pairs, data[tab.model], data[tab.max_length])


def settings_changed(studio: Studio, tab: DataTab, data: dict) -> dict:
    """The model or max length changed on the Train tab: count the tokens again."""
    return render(studio, tab, data[tab.dataset_path], data[tab.mapping], data[tab.model], data[tab.max_length])


def step_seen(tab: DataTab, delta: int, data: dict) -> dict:
    """The previous or next usable row in "What the model will see" (wrapping around)."""
    index = data[tab.seen_index] + delta
    return {tab.seen_index: index, tab.seen: seen_html(data[tab.view], index)}


def render(studio: Studio, tab: DataTab, path: str | None, pairs: str, model_ref: str | None, max_len) -> dict:
    """Everything the tab shows for a dataset and mapping (the one place that builds it).
    ``pairs`` is the person's own mapping ("" = detect); only that goes into the config."""
    if not path:
        return nothing_shown(tab, None, "", EMPTY_REPORT)
    try:
        view = studio.inspect_dataset(path, pairs, (model_ref or "default").strip(), int(max_len or 512))
    except DataError as exc:
        return nothing_shown(tab, None, "", f"**Can't use this file.** {exc}")
    except ModelError as exc:  # the file is fine: keep it, so fixing the model brings the report back
        return nothing_shown(
            tab,
            path,
            pairs,
            f"**Can't count tokens: the model cannot be loaded.** {exc} Change "
            "**Model** on the Train tab; this report updates when you leave that box.",
        )
    choices = [NONE, *view.columns]
    if view.report is None:  # readable, but no mapping works yet: keep what the person chose so far
        chosen = {role: col for col, _, role in (p.rpartition("=") for p in pairs.split(",") if "=" in p)}
        return {
            tab.dataset_path: path,
            tab.mapping: "",
            tab.view: view,
            tab.seen_index: 0,
            tab.report: f"**Can't use these columns yet.** {view.problem}",
            tab.histogram: None,
            tab.seen: "",
            tab.preview: view.preview,
            **{box: gr.Dropdown(choices=choices, value=chosen.get(r, NONE)) for r, box in tab.roles.items()},
        }
    roles = view.report.mapping.roles()
    stats = view.report.stats
    return {
        tab.dataset_path: path,
        tab.mapping: pairs,
        tab.view: view,
        tab.seen_index: 0,
        tab.report: report_markdown(view.report),
        tab.histogram: length_histogram(stats.lengths.tolist(), stats.max_length) if stats else None,
        tab.seen: seen_html(view, 0),
        tab.preview: view.preview,
        **{box: gr.Dropdown(choices=choices, value=roles.get(r, NONE)) for r, box in tab.roles.items()},
    }


def nothing_shown(tab: DataTab, path: str | None, pairs: str, report: str) -> dict:
    """The tab with no rows to show: only the report's sentence (the file and mapping kept)."""
    return {
        tab.dataset_path: path,
        tab.mapping: pairs,
        tab.view: None,
        tab.seen_index: 0,
        tab.report: report,
        tab.histogram: None,
        tab.seen: "",
        tab.preview: pd.DataFrame(),
        **{box: gr.Dropdown(choices=[NONE], value=NONE) for box in tab.roles.values()},
    }


def seen_html(view: DatasetView | None, index: int) -> str:
    """The rendered row with trained, masked and cut tokens marked. Every piece of text is
    escaped: a cell holding HTML must show as text, never run."""
    if view is None or not view.usable():
        return "<div class='fs-seen fs-empty'>No usable rows to show.</div>"
    parts = []
    for label, segments in view.sides(index):
        if label:  # a preference pair's side, or a feedback row's verdict
            parts.append(f"<span class='fs-side'>{html.escape(label)}</span>\n")
        marked_cut = False
        for seg in segments:
            if seg.cut and not marked_cut:
                parts.append("<span class='fs-cut-mark'>✂ max length</span>")
                marked_cut = True
            cls = "fs-cut" if seg.cut else ("fs-trained" if seg.trained else "fs-masked")
            parts.append(f"<span class='{cls}'>{html.escape(seg.text)}</span>")
        if label:
            parts.append("\n\n")
    n = len(view.usable())
    return (
        f"<div class='fs-seen-head'>Usable row {index % n + 1} of {n}</div><pre class='fs-seen'>{''.join(parts)}</pre>"
    )
