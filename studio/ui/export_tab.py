"""Export tab: download a finished run's adapter zip, merged model or GGUF (llama.cpp / Ollama), and
import an adapter zip.

Handlers are module functions of the ``Studio`` and the tab's components (:class:`ExportTab`):
they return ``{component: new value}``, so tests call them without a browser
(tests/test_export_tab.py)."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from studio.export.adapter_import import AdapterImportError
from studio.export.gguf_convert import QUANTS
from studio.export.gguf_export import DEFAULT_QUANT, read_parity
from studio.export.gguf_parity import Parity
from studio.export.zips import ExportError, zip_contents
from studio.formatting import format_bytes, markdown_cell
from studio.service import Studio
from studio.ui.views import run_choices

log = logging.getLogger(__name__)

EMPTY = pd.DataFrame(columns=["file", "size"])


@dataclass
class ExportTab:
    """The Export tab's components that handlers read or update, by name."""

    run: gr.Dropdown
    refresh: gr.Button
    adapter_button: gr.DownloadButton
    merge: gr.Button
    merged_button: gr.DownloadButton
    note: gr.Markdown
    contents: gr.Dataframe
    quant: gr.Dropdown
    gguf_build: gr.Button
    gguf_button: gr.DownloadButton
    gguf_note: gr.Markdown
    import_name: gr.Textbox
    import_upload: gr.File
    import_note: gr.Markdown

    @property
    def prepare_outputs(self) -> list:
        """What picking a run redraws: every button, both notes and the zip's contents."""
        return [
            self.adapter_button,
            self.merge,
            self.merged_button,
            self.gguf_build,
            self.gguf_button,
            self.gguf_note,
            self.note,
            self.contents,
        ]


def build_export_tab(studio: Studio) -> ExportTab:
    gr.Markdown(
        "The adapter zip holds `adapter_model.safetensors`, `adapter_config.json`, the tokenizer and "
        "chat template, the run's `config.yaml`, `metrics.csv`, the loss curve (`loss_curve.svg`), the "
        "base model's fingerprint and a model card (`README.md`) that says how to load it with PEFT, "
        "transformers or vLLM. The merged model is the base with the adapter folded in: a standalone "
        "safetensors model for tools that do not load adapters."
    )
    with gr.Row():
        run = gr.Dropdown(choices=run_choices(studio), value=None, label="Trained run", elem_id="export-run", scale=3)
        refresh = gr.Button("Refresh list", scale=1)
    with gr.Row():
        adapter_button = gr.DownloadButton("Download adapter zip", elem_id="export-button", interactive=False)
        merge = gr.Button("Build merged model", elem_id="export-merge", interactive=False)
        merged_button = gr.DownloadButton("Download merged model", elem_id="export-merged-button", interactive=False)
    note = gr.Markdown("", elem_id="export-status")
    contents = gr.Dataframe(
        EMPTY, label="What the adapter zip holds", elem_id="export-contents", interactive=False, wrap=True
    )
    with gr.Accordion("GGUF for llama.cpp, Ollama and LM Studio", open=True, elem_id="gguf-section"):
        gr.Markdown(
            "One GGUF file with the merged model, its tokenizer and the chat template it trained with, "
            "plus an Ollama `Modelfile` (template, stop tokens, system prompt) and a README. Before it is "
            "offered, the file is read back with transformers and compared with the merged model on "
            "held-out prompts; the numbers appear here and in the zip. **q8_0** is the usual choice "
            "(about half the size of f16, answers nearly always the same); **q4_0** is smaller and changes "
            "answers more; **f16**/**bf16** keep the weights as trained. Building takes a minute or two."
        )
        with gr.Row():
            quant = gr.Dropdown(choices=list(QUANTS), value=DEFAULT_QUANT, label="Type", elem_id="gguf-type", scale=1)
            gguf_build = gr.Button("Build GGUF", elem_id="gguf-build", interactive=False, scale=1)
            gguf_button = gr.DownloadButton("Download GGUF zip", elem_id="gguf-download", interactive=False, scale=1)
        gguf_note = gr.Markdown("", elem_id="gguf-status")
    with gr.Accordion("Import an adapter zip", open=False, elem_id="import-section"):
        gr.Markdown(
            "A zip exported by Finetune Studio, or a zipped PEFT LoRA folder (`adapter_config.json` + "
            "`adapter_model.safetensors`). It is checked before anything is kept: size, file names, "
            "safetensors only, and that its base model is on this machine and matches. It then appears "
            "in the Chat and Export tabs."
        )
        import_name = gr.Textbox(label="Name (optional)", elem_id="import-name", max_lines=1)
        import_upload = gr.File(label="Adapter zip", file_types=[".zip"], type="filepath", elem_id="import-upload")
        import_note = gr.Markdown("", elem_id="import-status")

    tab = ExportTab(
        run=run,
        refresh=refresh,
        adapter_button=adapter_button,
        merge=merge,
        merged_button=merged_button,
        note=note,
        contents=contents,
        quant=quant,
        gguf_build=gguf_build,
        gguf_button=gguf_button,
        gguf_note=gguf_note,
        import_name=import_name,
        import_upload=import_upload,
        import_note=import_note,
    )
    bind = functools.partial  # handlers are module functions of (studio, tab, ...)
    run.change(bind(prepare, studio, tab), inputs=run, outputs=tab.prepare_outputs)
    merge.click(bind(build_merged, studio, tab), inputs=run, outputs=[merged_button, note])
    gguf_build.click(bind(build_gguf, studio, tab), inputs={run, quant}, outputs=[gguf_button, gguf_note])
    quant.change(bind(quant_changed, tab), outputs=[gguf_button, gguf_note])
    import_upload.upload(bind(import_zip, studio, tab), inputs={import_upload, import_name}, outputs=[run, import_note])
    refresh.click(bind(refreshed_choices, studio), outputs=run)
    return tab


# ---- handlers: module functions of the Studio and the tab's components ------------------------


def refreshed_choices(studio: Studio) -> gr.Dropdown:
    """The finished runs again: runs finish while the page is open."""
    return gr.Dropdown(choices=run_choices(studio))


def prepare(studio: Studio, tab: ExportTab, run_id: str | None) -> dict:
    """A run was picked: build its adapter zip and offer it, show what it holds, and enable the
    merged and GGUF builds; a sentence (and every button off) when it cannot be exported."""
    off, no = _no_download(), gr.Button(interactive=False)
    out = {
        tab.adapter_button: off,
        tab.merge: no,
        tab.merged_button: off,
        tab.gguf_build: no,
        tab.gguf_button: off,
        tab.gguf_note: "",
        tab.note: "",
        tab.contents: EMPTY,
    }
    if not run_id:
        return out
    try:
        path = studio.export_run(run_id)
    except (LookupError, ExportError) as exc:
        return out | {tab.note: f"**Can't export.** {exc}"}
    yes = gr.Button(interactive=True)
    return out | {
        tab.adapter_button: gr.DownloadButton(value=str(path), interactive=True),
        tab.merge: yes,
        tab.gguf_build: yes,
        tab.note: f"Ready: `{path.name}` ({format_bytes(path.stat().st_size)}).",
        tab.contents: _contents(path),
    }


def build_merged(studio: Studio, tab: ExportTab, run_id: str | None) -> dict:
    """The merged model zip for its Download button; a sentence when it cannot be built."""
    button, note = _build(studio, run_id, "merged model", "Merged model ready", merged=True)
    return {tab.merged_button: button, tab.note: note}


def build_gguf(studio: Studio, tab: ExportTab, data: dict) -> dict:
    """The GGUF zip of the picked type, checked against the merged model, with the check's numbers."""
    button, note = _build(studio, data[tab.run], "GGUF", "GGUF ready", gguf=data[tab.quant])
    return {tab.gguf_button: button, tab.gguf_note: note}


def quant_changed(tab: ExportTab) -> dict:
    """Another GGUF type: the zip built for the last one is no longer offered."""
    return {tab.gguf_button: _no_download(), tab.gguf_note: ""}


def import_zip(studio: Studio, tab: ExportTab, data: dict) -> dict:
    """Check an uploaded adapter zip and keep it as a run, then select it; a sentence if refused."""
    path, display_name = data[tab.import_upload], data[tab.import_name]
    if not path:
        return {tab.run: gr.Dropdown(), tab.import_note: ""}
    try:
        new = studio.import_adapter(path, name=display_name or None)
    except AdapterImportError as exc:
        return {tab.run: gr.Dropdown(), tab.import_note: f"**Can't import.** {exc}"}
    except Exception as exc:  # noqa: BLE001 - a sentence on the page; details in the server log
        log.exception("import of %s failed", path)
        return {tab.run: gr.Dropdown(), tab.import_note: f"**Can't import.** {type(exc).__name__}: {exc}"}
    status = new.status()
    warnings = "".join(f"  \nWarning: {w}" for w in status.import_warnings or [])
    return {
        tab.run: gr.Dropdown(choices=run_choices(studio), value=new.id),
        tab.import_note: f"Imported as **{new.name}** (run `{new.id}`, base `{status.model}`). It is listed in "
        f"the Chat and Export tabs.{warnings}",
    }


def gguf_parity_markdown(parity: Parity) -> str:
    """The parity check as the Export tab shows it: the summary and one row per held-out prompt."""
    rows = "\n".join(
        "| "
        + " | ".join(
            (
                markdown_cell(p.prompt[-100:], 100),
                markdown_cell(p.answer, 120),
                markdown_cell(p.gguf_answer, 120),
                "yes" if p.same else "**no**",
            )
        )
        + " |"
        for p in parity.prompts
    )
    changed = len(parity.prompts) - parity.greedy_same
    warning = (
        f"\n\n**{changed} of {len(parity.prompts)} greedy answers changed** with {parity.quant}: the "
        "quantisation costs this model accuracy; q8_0 or f16 keep its answers."
        if changed
        else ""
    )
    return (
        f"**Checked against the merged model.** {parity.summary()}.{warning}\n\n"
        "| held-out prompt | merged model | GGUF | same |\n|---|---|---|---|\n" + rows
    )


# ---- helpers ----------------------------------------------------------------------------------


def _build(studio: Studio, run_id: str | None, what: str, ready: str, **kind) -> tuple[gr.DownloadButton, str]:
    """Build the merged or GGUF zip: (its Download button, the note), or a sentence when it cannot be."""
    if not run_id:
        return _no_download(), "Pick a run first."
    try:
        path = studio.export_run(run_id, **kind)
    except (LookupError, ExportError) as exc:
        return _no_download(), f"**Can't build the {what}.** {exc}"
    except Exception as exc:  # noqa: BLE001 - a sentence on the page; details in the server log
        log.exception("%s export of %s failed", what, run_id)
        return _no_download(), f"**Can't build the {what}.** {type(exc).__name__}: {exc}"
    note = f"{ready}: `{path.name}` ({format_bytes(path.stat().st_size)})."
    if "gguf" in kind:
        note += "\n\n" + gguf_parity_markdown(Parity.from_dict(read_parity(path)))
    return gr.DownloadButton(value=str(path), interactive=True), note


def _no_download() -> gr.DownloadButton:
    return gr.DownloadButton(value=None, interactive=False)


def _contents(path: Path) -> pd.DataFrame:
    return pd.DataFrame([(name, format_bytes(size)) for name, size in zip_contents(path)], columns=["file", "size"])
