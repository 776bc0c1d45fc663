"""Data tab: upload a file (or take the sample), see its format, a report and a preview."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from studio.data import DataError
from studio.service import Studio

SAMPLE = Path(__file__).resolve().parents[2] / "templates" / "samples" / "instructions.csv"


def build_data_tab(studio: Studio, dataset_path: gr.State) -> None:
    gr.Markdown("Upload a **CSV** (or TSV, JSONL, JSON, Parquet) with `instruction,output` "
                "(optional `input`) or `prompt,completion` columns, or chat `messages`.")
    with gr.Row():
        upload = gr.File(label="Dataset file", elem_id="data-upload", file_count="single",
                         file_types=[".csv", ".tsv", ".jsonl", ".json", ".parquet"], scale=3)
        sample = gr.Button("Use the sample dataset", elem_id="data-sample", scale=1)
    report = gr.Markdown("No dataset yet.", elem_id="data-report")
    preview = gr.Dataframe(label="Preview (first rows)", elem_id="data-preview", interactive=False,
                           wrap=True, max_height=420)

    def show(path: str | None):
        if not path:
            return None, "No dataset yet.", pd.DataFrame()
        try:
            view = studio.import_dataset(path)
        except DataError as exc:
            return None, f"**Can't use this file.** {exc}", pd.DataFrame()
        return view.path, view.report.to_markdown(), view.preview

    upload.upload(show, inputs=upload, outputs=[dataset_path, report, preview])
    upload.clear(lambda: (None, "No dataset yet.", pd.DataFrame()), outputs=[dataset_path, report, preview])
    sample.click(lambda: show(str(SAMPLE)), outputs=[dataset_path, report, preview])
