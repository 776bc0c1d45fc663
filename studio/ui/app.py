"""The whole page: the tabs' builders put together, and the options it is launched with."""

from __future__ import annotations

import functools
import importlib.resources

import gradio as gr

from studio.service import Studio
from studio.ui import chat_tab, eval_tab, export_tab, registry_tab
from studio.ui.data_tab import build_data_tab, wire_data_tab
from studio.ui.train_tab import PLAN_EVENT, build_train_tab

CSS = importlib.resources.files("studio.ui") / "studio.css"  # package data, found wherever it is installed


def build_app(studio: Studio) -> gr.Blocks:
    """The whole page. Server-owned state lives in ``studio``; per-tab state in gr.State."""
    with gr.Blocks(title="Finetune Studio") as demo:
        gr.Markdown("# Finetune Studio\nUpload examples, train, compare, download.")
        # Per browser tab: the dataset this person picked and its column mapping (column=role pairs).
        dataset_path, mapping = gr.State(None), gr.State("")
        with gr.Tabs():
            with gr.Tab("Data", elem_id="tab-data") as data_page:
                data = build_data_tab(dataset_path, mapping)
            with gr.Tab("Train", elem_id="tab-train") as train_page:
                train = build_train_tab(studio, dataset_path, mapping)
            with gr.Tab("Chat", elem_id="tab-chat") as chat_page:
                chat = chat_tab.build_chat_tab(studio)
            with gr.Tab("Evaluate", elem_id="tab-evaluate") as eval_page:
                evaluation = eval_tab.build_eval_tab(studio)
            with gr.Tab("Export", elem_id="tab-export") as export_page:
                export = export_tab.build_export_tab(studio)
            with gr.Tab("Registry", elem_id="tab-registry") as registry_page:
                registry = registry_tab.build_registry_tab(studio)
        # Validation counts tokens with the Train tab's model and max length: wired once both exist.
        wire_data_tab(studio, data, train.model, train.max_length)
        # Runs finish while the page is open: refresh the run lists whenever their tab opens.
        chat_page.select(functools.partial(chat_tab.refreshed_choices, studio), outputs=chat.run)
        eval_page.select(
            functools.partial(eval_tab.refreshed_choices, studio), outputs=[evaluation.run, evaluation.against]
        )
        export_page.select(functools.partial(export_tab.refreshed_choices, studio), outputs=export.run)
        registry_page.select(
            functools.partial(registry_tab.refreshed, studio, registry),
            inputs={registry.name, registry.run},
            outputs=[
                registry.deployments,
                registry.history,
                registry.version,
                registry.run,
                registry.versions,
                registry.status,
            ],
        )
        # The deployments table follows changes made elsewhere only while it is on screen.
        registry_page.select(lambda: gr.Timer(active=True), outputs=registry.timer)
        for page in (data_page, train_page, chat_page, eval_page, export_page):
            page.select(lambda: gr.Timer(active=False), outputs=registry.timer)
        demo.load(train.show_plan, inputs=train.plan_inputs, outputs=train.plan_outputs, **PLAN_EVENT)
    return demo


def launch_kwargs(studio: Studio) -> dict:
    """Options for ``demo.launch``: files under the runs folder may be downloaded, nothing else;
    uploads above the largest thing we accept (an adapter zip) are cut off by the server before
    they are written to disk, not after. With ``studio.serving`` set, the OpenAI-compatible API's
    routes are part of the server's app from its first request (added after launch, a client
    could reach the page before /v1 existed)."""
    from studio.export.adapter_import import max_import_bytes

    kwargs = {
        "css": CSS.read_text(encoding="utf-8"),
        "allowed_paths": [str(studio.runs_root.resolve())],
        "theme": gr.themes.Soft(),
        "footer_links": [],
        "max_file_size": max_import_bytes(),
    }
    if studio.serving is not None:
        from studio.serving.openai_api import create_router

        kwargs["app_kwargs"] = {"routes": create_router(studio.serving).routes}
    return kwargs
