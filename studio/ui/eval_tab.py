"""Evaluate tab: did the fine-tune help? Base (or another adapter) and the adapter answer the same
rows; each metric with its 95% interval, the paired difference and win/tie/loss; the verdict in
words; how far the adapter moved outside the task; every row, filterable and downloadable; and
every run/version scored on the same rows side by side.

The numbers come from ``Studio.evaluate_task`` (studio/evaluation/task.py), the same call
``finetune-studio eval`` makes, and are stored with the run: picking a run shows its latest
stored evaluation, so a reload or a restart keeps the scores (studio/evaluation/stored.py).

Handlers are module functions of the ``Studio`` and the tab's components (:class:`EvalTab`),
returning ``{component: value}``, so tests call them without a browser.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from studio.evaluation import regression, stored
from studio.evaluation.metrics import NAMES
from studio.formatting import slug
from studio.inference.playground import split_ref
from studio.models import ModelError
from studio.service import Studio
from studio.ui.eval_views import (
    BASE,
    HELD_OUT,
    METRIC_COLUMNS,
    checkpoints_markdown,
    labels_markdown,
    scores_frame,
    summary_markdown,
)
from studio.ui.views import chat_choices

A_FILE = "an eval file"
PICK = "Pick a trained run to evaluate."
GENERAL_DEFAULT = regression.DEFAULT_PROMPTS


@dataclass
class EvalTab:
    """The Evaluate tab's components that handlers read or update, by name."""

    run: gr.Dropdown
    against: gr.Dropdown
    refresh: gr.Button
    source: gr.Radio
    eval_file: gr.File
    mapping: gr.Textbox
    rows: gr.Slider
    metrics: gr.Dropdown
    pattern: gr.Textbox
    schema: gr.Textbox
    general: gr.Slider
    judge_url: gr.Textbox
    judge_model: gr.Textbox
    judge_key: gr.Textbox
    start: gr.Button
    stop: gr.Button
    history: gr.Dropdown
    summary: gr.Markdown
    scores: gr.Dataframe
    labels: gr.Markdown
    show: gr.Dropdown
    table: gr.Dataframe
    csv: gr.DownloadButton
    jsonl: gr.DownloadButton
    comparison: gr.Dataframe

    @property
    def settings(self) -> set:
        """What Evaluate reads."""
        return {
            self.run,
            self.against,
            self.source,
            self.eval_file,
            self.mapping,
            self.rows,
            self.metrics,
            self.pattern,
            self.schema,
            self.general,
            self.judge_url,
            self.judge_model,
            self.judge_key,
        }

    @property
    def shown(self) -> list:
        """What showing one stored evaluation updates."""
        return [
            self.summary,
            self.scores,
            self.labels,
            self.show,
            self.table,
            self.csv,
            self.jsonl,
            self.comparison,
        ]


def build_eval_tab(studio: Studio) -> EvalTab:
    gr.Markdown(
        "Base and adapter answer the same rows; each answer is scored against the reference. "
        "Every score comes with its 95% interval, and the difference is paired row by row."
    )
    with gr.Row():
        choices = chat_choices(studio)
        run = gr.Dropdown(choices=choices, value=None, label="Adapter to evaluate", elem_id="eval-run", scale=3)
        against = gr.Dropdown(
            choices=[("the base model", BASE)] + choices,
            value=BASE,
            label="Compared with",
            elem_id="eval-against",
            scale=3,
            info="The base, or another adapter trained the same way on the same base (same rows, paired).",
        )
        refresh = gr.Button("Refresh lists", scale=1)
    with gr.Row():
        source = gr.Radio([HELD_OUT, A_FILE], value=HELD_OUT, label="Rows", elem_id="eval-source", scale=2)
        rows = gr.Slider(5, 500, value=50, step=5, label="At most this many rows", elem_id="eval-rows", scale=2)
    with gr.Row(visible=False) as file_row:
        eval_file = gr.File(
            label="Eval file (CSV, TSV, JSONL, JSON, Parquet)",
            file_types=[".csv", ".tsv", ".jsonl", ".json", ".parquet"],
            type="filepath",
            elem_id="eval-file",
        )
        mapping = gr.Textbox(
            label="Columns (optional)",
            placeholder="question=prompt,answer=response",
            info="column=role pairs; empty: the run's own mapping, else detected",
            elem_id="eval-mapping",
        )
    with gr.Accordion("Metrics (picked from your references unless you choose)", open=False):
        metrics = gr.Dropdown(
            choices=list(NAMES),
            value=[],
            multiselect=True,
            label="Metrics (empty: picked for you)",
            elem_id="eval-metrics",
        )
        with gr.Row():
            pattern = gr.Textbox(label="Regular expression (for regex)", elem_id="eval-pattern")
            schema = gr.Textbox(label="JSON Schema (for json)", lines=3, elem_id="eval-schema")
    general = gr.Slider(
        0,
        100,
        value=GENERAL_DEFAULT,
        step=5,
        label="General prompts: how far the adapter moved outside your task (0 skips)",
        elem_id="eval-general",
    )
    with gr.Accordion("LLM judge (optional): a bigger model compares the answers", open=False):
        gr.Markdown(
            "Any OpenAI-compatible API: Ollama (`http://localhost:11434/v1`), vLLM, a hosted API, or another "
            "`finetune-studio serve`. It is asked which answer is better in both orders (position bias cancels) "
            "and whether each answer matches the reference. The key is sent to that URL, never stored."
        )
        with gr.Row():
            judge_url = gr.Textbox(
                label="Judge API URL", placeholder="http://localhost:11434/v1", elem_id="eval-judge-url"
            )
            judge_model = gr.Textbox(label="Judge model", placeholder="qwen2.5:14b", elem_id="eval-judge-model")
            judge_key = gr.Textbox(label="API key (if it needs one)", type="password", elem_id="eval-judge-key")
    with gr.Row():
        start = gr.Button("Evaluate", variant="primary", elem_id="eval-start", scale=3)
        checkpoints = gr.Button("Score every checkpoint", elem_id="eval-checkpoints", scale=2)
        stop = gr.Button("Stop", elem_id="eval-stop", scale=1)
    history = gr.Dropdown(choices=[], value=None, label="Stored evaluations of this run", elem_id="eval-history")
    summary = gr.Markdown(PICK, elem_id="eval-summary")
    scores = gr.Dataframe(headers=METRIC_COLUMNS, value=None, interactive=False, wrap=True, elem_id="eval-scores")
    labels = gr.Markdown("", elem_id="eval-labels")
    with gr.Accordion("Every row: prompt, reference, both answers, each score", open=True):
        with gr.Row():
            show = gr.Dropdown(
                choices=stored.FILTERS, value=stored.ALL_ROWS, label="Show", elem_id="eval-filter", scale=3
            )
            csv = gr.DownloadButton("Download CSV", elem_id="eval-csv", interactive=False, scale=1)
            jsonl = gr.DownloadButton("Download JSONL", elem_id="eval-jsonl", interactive=False, scale=1)
        table = gr.Dataframe(value=None, interactive=False, wrap=True, max_height=520, elem_id="eval-table-rows")
    with gr.Accordion("Every run and version scored on these rows", open=True):
        comparison = gr.Dataframe(value=None, interactive=False, wrap=True, elem_id="eval-compare")

    tab = EvalTab(
        run=run,
        against=against,
        refresh=refresh,
        source=source,
        eval_file=eval_file,
        mapping=mapping,
        rows=rows,
        metrics=metrics,
        pattern=pattern,
        schema=schema,
        general=general,
        judge_url=judge_url,
        judge_model=judge_model,
        judge_key=judge_key,
        start=start,
        stop=stop,
        history=history,
        summary=summary,
        scores=scores,
        labels=labels,
        show=show,
        table=table,
        csv=csv,
        jsonl=jsonl,
        comparison=comparison,
    )
    bind = functools.partial
    source.change(lambda s: gr.Row(visible=s == A_FILE), inputs=source, outputs=file_row)
    run.change(bind(pick, studio, tab), inputs=run, outputs=[history, *tab.shown])
    history.change(bind(show_stored, studio, tab), inputs={run, history}, outputs=tab.shown)
    show.change(bind(filter_rows, studio, tab), inputs={run, history, show}, outputs=[table, csv])
    refresh.click(bind(refreshed_choices, studio), outputs=[run, against])
    start.click(bind(evaluate, studio, tab), inputs=tab.settings, outputs=[history, *tab.shown])
    checkpoints.click(bind(score_checkpoints, studio, tab), inputs=tab.settings, outputs=[summary, comparison])
    stop.click(bind(stop_evaluations, studio))
    return tab


# ---- handlers ------------------------------------------------------------------------------


def refreshed_choices(studio: Studio) -> tuple[gr.Dropdown, gr.Dropdown]:
    choices = chat_choices(studio)
    return gr.Dropdown(choices=choices), gr.Dropdown(choices=[("the base model", BASE)] + choices)


def pick(studio: Studio, tab: EvalTab, ref: str | None) -> dict:
    """The run's stored evaluations, the latest shown."""
    if not ref:
        return {tab.history: gr.Dropdown(choices=[], value=None), **_nothing(tab, PICK)}
    try:
        found = _stored_for(studio, ref)
    except LookupError as exc:
        return {tab.history: gr.Dropdown(choices=[], value=None), **_nothing(tab, f"**{exc}**")}
    if not found:
        note = f"`{ref}` has not been evaluated yet: *Evaluate* scores it (a few minutes on a CPU for 50 rows)."
        return {tab.history: gr.Dropdown(choices=[], value=None), **_nothing(tab, note)}
    return {tab.history: _history(found, found[0]), **_shown(studio, tab, found[0])}


def show_stored(studio: Studio, tab: EvalTab, data: dict) -> dict:
    ref, path = data[tab.run], data[tab.history]
    if not ref or not path:
        return {c: gr.skip() for c in tab.shown}
    try:
        result = _one(studio, ref, path)
    except LookupError as exc:
        return _nothing(tab, f"**{exc}**")
    return _shown(studio, tab, result)


def filter_rows(studio: Studio, tab: EvalTab, data: dict) -> dict:
    ref, path = data[tab.run], data[tab.history]
    if not ref or not path:
        return {tab.table: gr.skip(), tab.csv: gr.skip()}
    try:
        result = _one(studio, ref, path)
    except LookupError as exc:
        gr.Warning(str(exc))
        return {tab.table: gr.skip(), tab.csv: gr.skip()}
    frame = stored.drill_down(result, stored.examples(result), data[tab.show] or stored.ALL_ROWS)
    return {tab.table: frame, tab.csv: _csv_button(result, frame, data[tab.show])}


def evaluate(studio: Studio, tab: EvalTab, data: dict, progress=gr.Progress()) -> dict:
    """Run an evaluation with the tab's settings; show it (and list it with the stored ones)."""
    from studio.evaluation.task import EvaluationStopped

    skip = {c: gr.skip() for c in [tab.history, *tab.shown]}
    options = _options(tab, data)
    if options is None:
        return skip
    judge = None
    url, model = (data[tab.judge_url] or "").strip(), (data[tab.judge_model] or "").strip()
    if url or model:
        from studio.evaluation.judge import JudgeSettings

        try:
            judge = JudgeSettings(url=url, model=model, key=(data[tab.judge_key] or "").strip() or None)
        except ValueError as exc:
            gr.Warning(str(exc))
            return skip
    ref = data[tab.run]
    try:
        result = studio.evaluate_task(
            ref,
            against=data[tab.against] or BASE,
            regression_prompts=int(data[tab.general]),
            judge=judge,
            progress=_reporter(progress),
            **options,
        )
    except EvaluationStopped as exc:
        return {**skip, tab.summary: f"**{exc}**"}
    except (LookupError, ValueError, ModelError) as exc:
        return {**skip, tab.summary: f"**Can't evaluate.** {exc}"}
    result = _one(studio, ref, result["path"])  # as stored: what a reload will show
    return {tab.history: _history(_stored_for(studio, ref), result), **_shown(studio, tab, result)}


def score_checkpoints(studio: Studio, tab: EvalTab, data: dict, progress=gr.Progress()) -> dict:
    """Every checkpoint of the picked run and its final weights against the base, on the tab's
    rows and metrics: which is best at the task (studio/evaluation/checkpoints.py)."""
    from studio.evaluation.task import EvaluationStopped

    skip = {tab.summary: gr.skip(), tab.comparison: gr.skip()}
    options = _options(tab, data)
    if options is None:
        return skip
    run_id, _ = split_ref(data[tab.run])
    try:
        summary = studio.evaluate_checkpoints(run_id, progress=_reporter(progress), **options)
    except EvaluationStopped as exc:
        return {**skip, tab.summary: f"**{exc}**"}
    except (LookupError, ValueError, ModelError) as exc:
        return {**skip, tab.summary: f"**Can't score the checkpoints.** {exc}"}
    return {
        tab.summary: checkpoints_markdown(summary),
        tab.comparison: studio.evaluation_comparison(summary["eval_set_sha256"]),
    }


def _options(tab: EvalTab, data: dict) -> dict | None:
    """The rows and metrics the tab asks for, as ``evaluate_task`` takes them; None (and a
    warning) when there is no run or no eval file."""
    if not data[tab.run]:
        gr.Warning(PICK)
        return None
    eval_path = None
    if data[tab.source] == A_FILE:
        eval_path = data[tab.eval_file]
        if not eval_path:
            gr.Warning("Upload an eval file first, or score the run's held-out rows.")
            return None
    return {
        "eval_path": eval_path,
        "mapping": (data[tab.mapping] or "").strip() if eval_path else "",
        "rows": int(data[tab.rows]),
        "metrics": list(data[tab.metrics] or []) or None,
        "pattern": (data[tab.pattern] or "").strip() or None,
        "schema": (data[tab.schema] or "").strip() or None,
    }


def _reporter(progress):
    def report(done: int, total: int, eta_s: float | None) -> None:
        left = f", about {eta_s:.0f} s left" if eta_s is not None else ""
        progress((done, total), desc=f"{done} of {total} answered{left}")

    return report


def stop_evaluations(studio: Studio) -> None:
    if studio.stop_evaluations():
        gr.Info(
            "Stopping after the rows in flight: while answering, nothing is stored; while judging, the "
            "scores are stored without the judge's verdicts."
        )
    else:
        gr.Info("No evaluation is running.")


# ---- helpers ---------------------------------------------------------------------------------


def _stored_for(studio: Studio, ref: str) -> list[dict]:
    """The stored evaluations of exactly this run or checkpoint."""
    run_id, checkpoint = split_ref(ref)
    return [r for r in studio.evaluations(run_id) if r.get("checkpoint") == checkpoint]


def _one(studio: Studio, ref: str, path: str) -> dict:
    for result in studio.evaluations(split_ref(ref)[0]):
        if result["path"] == path:
            return result
    raise LookupError(f"That evaluation of {ref} is no longer stored; pick another.")


def _history(found: list[dict], current: dict) -> gr.Dropdown:
    return gr.Dropdown(choices=[(stored.label(r), r["path"]) for r in found], value=current["path"])


def _shown(studio: Studio, tab: EvalTab, result: dict) -> dict:
    rows = stored.examples(result)
    frame = stored.drill_down(result, rows)
    jsonl = result["examples"] if Path(result["examples"]).is_file() else None
    return {
        tab.summary: summary_markdown(result),
        tab.scores: scores_frame(result),
        tab.labels: labels_markdown(result),
        tab.show: gr.Dropdown(choices=stored.filter_choices(result), value=stored.ALL_ROWS),
        tab.table: frame,
        tab.csv: _csv_button(result, frame, stored.ALL_ROWS),
        tab.jsonl: gr.DownloadButton(value=jsonl, interactive=jsonl is not None),
        tab.comparison: studio.evaluation_comparison(result["eval_set_sha256"]),
    }


def _nothing(tab: EvalTab, note: str) -> dict:
    return {
        tab.summary: note,
        tab.scores: None,
        tab.labels: "",
        tab.show: gr.Dropdown(choices=stored.FILTERS, value=stored.ALL_ROWS),
        tab.table: None,
        tab.csv: gr.DownloadButton(value=None, interactive=False),
        tab.jsonl: gr.DownloadButton(value=None, interactive=False),
        tab.comparison: None,
    }


def _csv_button(result: dict, frame: pd.DataFrame, show: str | None) -> gr.DownloadButton:
    """The rows shown, as CSV beside the evaluation (under the runs folder: the page may serve it)."""
    path = Path(result["path"])
    name = f"{path.stem}-{slug(show or stored.ALL_ROWS)}.csv"
    return gr.DownloadButton(value=str(stored.to_csv(frame, path.with_name(name))), interactive=True)
