"""Export tab: pick a finished run, download its adapter zip (loads in plain PEFT)."""

from __future__ import annotations

import gradio as gr

from studio.export import ExportError
from studio.service import Studio
from studio.ui.chat_tab import run_choices


def build_export_tab(studio: Studio) -> gr.Dropdown:
    gr.Markdown("The zip holds `adapter_model.safetensors`, `adapter_config.json`, the tokenizer and "
                "chat template, the run's `config.yaml`, `metrics.csv` and a model card (`README.md`).")
    with gr.Row():
        run = gr.Dropdown(choices=run_choices(studio), value=None, label="Trained run",
                          elem_id="export-run", scale=3)
        refresh = gr.Button("Refresh list", scale=1)
    button = gr.DownloadButton("Download adapter zip", elem_id="export-button", interactive=False)
    note = gr.Markdown("", elem_id="export-status")

    def prepare(run_id):
        if not run_id:
            return gr.DownloadButton(value=None, interactive=False), ""
        try:
            path = studio.export_run(run_id)
        except (LookupError, ExportError) as exc:
            return gr.DownloadButton(value=None, interactive=False), f"**Can't export.** {exc}"
        size = path.stat().st_size / 1e6
        return (gr.DownloadButton(value=str(path), interactive=True),
                f"Ready: `{path.name}` ({size:.1f} MB).")

    run.change(prepare, inputs=run, outputs=[button, note])
    refresh.click(lambda: gr.Dropdown(choices=run_choices(studio)), outputs=run)
    return run
