"""Past runs, under the Train tab: the runs table, curves of several runs overlaid with the
settings that differ, rename and delete."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import gradio as gr

from studio.config import ConfigError
from studio.formatting import markdown_cell
from studio.service import Studio
from studio.ui.plots import overlay_figure
from studio.ui.views import runs_frame


@dataclass
class PastRuns:
    """The panel's components that change when the list of runs does."""

    runs_table: gr.Dataframe
    compare: gr.Dropdown
    manage: gr.Dropdown

    @property
    def components(self) -> list:
        return [self.runs_table, self.compare, self.manage]


def build_past_runs(studio: Studio, log_scale: gr.Checkbox) -> PastRuns:
    with gr.Accordion("Past runs: compare curves and settings", open=False):
        runs_table = gr.Dataframe(runs_frame(studio), elem_id="runs-table", interactive=False, wrap=True)
        ids = [r.id for r in studio.runs()]
        compare = gr.Dropdown(
            label="Runs to compare (two or more)", multiselect=True, elem_id="runs-compare", choices=ids, value=[]
        )
        overlay = gr.Plot(elem_id="runs-overlay", label="Loss by run")
        diff = gr.Markdown(elem_id="runs-diff")
        with gr.Row():
            manage = gr.Dropdown(
                label="Rename or delete a run", elem_id="runs-manage", scale=2, choices=ids, value=None
            )
            new_name = gr.Textbox(label="New name", elem_id="runs-new-name", scale=2, max_length=80)
            rename_btn = gr.Button("Rename", elem_id="runs-rename", scale=1)
        with gr.Row():
            confirm = gr.Checkbox(
                label="Yes, delete this run's adapter, checkpoints and metrics for good",
                elem_id="runs-confirm-delete",
                scale=3,
            )
            delete_btn = gr.Button("Delete run", variant="stop", elem_id="runs-delete", scale=1)
        manage_note = gr.Markdown(elem_id="runs-manage-note")
    bind = functools.partial
    compare.change(bind(compare_runs, studio), inputs=[compare, log_scale], outputs=[overlay, diff])
    manage_outputs = [manage_note, runs_table, manage, compare, confirm]
    rename_btn.click(bind(rename, studio), inputs=[manage, new_name], outputs=manage_outputs)
    delete_btn.click(bind(delete, studio), inputs=[manage, confirm], outputs=manage_outputs)
    return PastRuns(runs_table, compare, manage)


def refreshed(studio: Studio, past: PastRuns) -> dict:
    """``{component: value}`` that redraws the table and both run lists (after a job changes state)."""
    ids = [r.id for r in studio.runs()]
    return {
        past.runs_table: runs_frame(studio),
        past.compare: gr.Dropdown(choices=ids),
        past.manage: gr.Dropdown(choices=ids),
    }


def compare_runs(studio: Studio, run_ids, log):
    run_ids = run_ids or []
    if len(run_ids) < 2:
        return None, "Pick two or more runs to overlay their curves and compare their settings."
    try:
        fig = overlay_figure(studio.curves(run_ids), log)
        a, b = run_ids[0], run_ids[1]
        rows = studio.config_diff(a, b)
    except (LookupError, ConfigError) as exc:
        return None, f"**{exc}**"
    if not rows:
        return fig, f"`{a}` and `{b}` used the same settings."
    table = "\n".join(f"| `{k}` | {_cell(va)} | {_cell(vb)} |" for k, va, vb in rows)
    return fig, f"Settings that differ:\n\n| setting | `{a}` | `{b}` |\n|---|---|---|\n{table}"


def _after_change(studio: Studio, note: str):
    ids = [r.id for r in studio.runs()]
    return note, runs_frame(studio), gr.Dropdown(choices=ids, value=None), gr.Dropdown(choices=ids, value=[]), False


def rename(studio: Studio, run_id, name):
    if not run_id:
        return "Pick a run to rename.", *(gr.skip(),) * 4
    try:
        name = studio.rename_run(run_id, name)
    except (LookupError, ValueError) as exc:
        return f"**{exc}**", *(gr.skip(),) * 4
    return _after_change(studio, f"`{run_id}` is now called **{name}**.")


def delete(studio: Studio, run_id, sure):
    if not run_id:
        return "Pick a run to delete.", *(gr.skip(),) * 4
    if not sure:
        return "Tick the box to confirm: deleting removes the run's files for good.", *(gr.skip(),) * 4
    try:
        studio.delete_run(run_id)
    except (LookupError, ValueError) as exc:
        return f"**{exc}**", *(gr.skip(),) * 4
    return _after_change(studio, f"Deleted `{run_id}`.")


def _cell(value) -> str:
    return markdown_cell(value, empty="(empty)")
