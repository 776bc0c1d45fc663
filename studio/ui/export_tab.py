"""Export tab: download a finished run's adapter zip, merged model or GGUF (llama.cpp / Ollama), and
import an adapter zip."""

from __future__ import annotations

import logging

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


def _contents(path) -> pd.DataFrame:
    return pd.DataFrame([(name, format_bytes(size)) for name, size in zip_contents(path)], columns=["file", "size"])


EMPTY = pd.DataFrame(columns=["file", "size"])


def build_export_tab(studio: Studio) -> gr.Dropdown:
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
        button = gr.DownloadButton("Download adapter zip", elem_id="export-button", interactive=False)
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
        name = gr.Textbox(label="Name (optional)", elem_id="import-name", max_lines=1)
        upload = gr.File(label="Adapter zip", file_types=[".zip"], type="filepath", elem_id="import-upload")
        import_note = gr.Markdown("", elem_id="import-status")

    def prepare(run_id):
        off = gr.DownloadButton(value=None, interactive=False)
        no = gr.Button(interactive=False)
        if not run_id:
            return off, no, off, no, off, "", "", EMPTY
        try:
            path = studio.export_run(run_id)
        except (LookupError, ExportError) as exc:
            return off, no, off, no, off, "", f"**Can't export.** {exc}", EMPTY
        yes = gr.Button(interactive=True)
        return (
            gr.DownloadButton(value=str(path), interactive=True),
            yes,
            off,
            yes,
            off,
            "",
            f"Ready: `{path.name}` ({format_bytes(path.stat().st_size)}).",
            _contents(path),
        )

    def build(run_id, what: str, ready: str, **kind):
        """Build the merged or GGUF zip for the Download button; a sentence when it cannot be."""
        off = gr.DownloadButton(value=None, interactive=False)
        if not run_id:
            return off, "Pick a run first."
        try:
            path = studio.export_run(run_id, **kind)
        except (LookupError, ExportError) as exc:
            return off, f"**Can't build the {what}.** {exc}"
        except Exception as exc:  # noqa: BLE001 - a sentence on the page; details in the server log
            log.exception("%s export of %s failed", what, run_id)
            return off, f"**Can't build the {what}.** {type(exc).__name__}: {exc}"
        note = f"{ready}: `{path.name}` ({format_bytes(path.stat().st_size)})."
        if "gguf" in kind:
            note += "\n\n" + gguf_parity_markdown(Parity.from_dict(read_parity(path)))
        return gr.DownloadButton(value=str(path), interactive=True), note

    def build_merged(run_id):
        return build(run_id, "merged model", "Merged model ready", merged=True)

    def build_gguf(run_id, quant_name):
        return build(run_id, "GGUF", "GGUF ready", gguf=quant_name)

    def do_import(path, display_name):
        if not path:
            return gr.Dropdown(), ""
        try:
            new = studio.import_adapter(path, name=display_name or None)
        except AdapterImportError as exc:
            return gr.Dropdown(), f"**Can't import.** {exc}"
        except Exception as exc:  # noqa: BLE001 - a sentence on the page; details in the server log
            log.exception("import of %s failed", path)
            return gr.Dropdown(), f"**Can't import.** {type(exc).__name__}: {exc}"
        status = new.status()
        warnings = "".join(f"  \nWarning: {w}" for w in status.import_warnings or [])
        return (
            gr.Dropdown(choices=run_choices(studio), value=new.id),
            f"Imported as **{new.name}** (run `{new.id}`, base `{status.model}`). It is listed in "
            f"the Chat and Export tabs.{warnings}",
        )

    run.change(
        prepare, inputs=run, outputs=[button, merge, merged_button, gguf_build, gguf_button, gguf_note, note, contents]
    )
    merge.click(build_merged, inputs=run, outputs=[merged_button, note])
    gguf_build.click(build_gguf, inputs=[run, quant], outputs=[gguf_button, gguf_note])
    quant.change(lambda: (gr.DownloadButton(value=None, interactive=False), ""), outputs=[gguf_button, gguf_note])
    upload.upload(do_import, inputs=[upload, name], outputs=[run, import_note])
    refresh.click(lambda: gr.Dropdown(choices=run_choices(studio)), outputs=run)
    return run


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
