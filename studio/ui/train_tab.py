"""Train tab: model, method and hyperparameters; Train/Stop; live progress, loss and memory.

The job belongs to the server (``studio.jobs``); this tab only polls it with a gr.Timer, so
reloading the page or opening a second tab shows the same running job.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from studio.cli import command_for
from studio.config import ConfigError, RunConfig, field_help
from studio.service import JobView, Studio
from studio.ui.plots import loss_figure, memory_figure

POLL_SECONDS = 0.5


def _progress_html(view: JobView) -> str:
    pct = 100 * view.step / view.total_steps if view.total_steps else 0
    return (f'<div class="fs-progress" data-step="{view.step}" data-total="{view.total_steps}">'
            f'<div class="fs-progress-bar" style="width:{pct:.1f}%"></div></div>')


@dataclass
class TrainControls:
    """Controls other tabs read: the Data tab counts tokens with this model and max length."""

    model: gr.Textbox
    max_length: gr.Number


def build_train_tab(studio: Studio, dataset_path: gr.State, mapping: gr.State) -> TrainControls:
    defaults = RunConfig()
    gr.Markdown(f"**Hardware:** {studio.hardware.summary()}", elem_id="hardware-summary")
    with gr.Row():
        model = gr.Textbox(value=defaults.model, label="Model", elem_id="model-name", scale=2,
                           info="default = SmolLM2-135M-Instruct (bundled, works offline); or a hub id or local folder.")
        method = gr.Radio(["full", "lora", "qlora"], value=defaults.method, label="Method",
                          elem_id="method-picker", info=field_help("method"), scale=2)
    t = defaults.training
    with gr.Row():
        epochs = gr.Number(value=t.epochs, label="Epochs", info=field_help("training.epochs"), minimum=0)
        max_steps = gr.Number(value=t.max_steps, label="Max steps", precision=0, elem_id="train-max-steps",
                              info=field_help("training.max_steps"), minimum=0)
        lr = gr.Number(value=t.learning_rate, label="Learning rate", info=field_help("training.learning_rate"))
        batch = gr.Number(value=t.batch_size, label="Batch size", precision=0, minimum=1,
                          info=field_help("training.batch_size"))
        max_len = gr.Number(value=defaults.data.max_length, label="Max length (tokens)", precision=0,
                            info=field_help("data.max_length"))
    with gr.Accordion("LoRA and evaluation", open=False):
        lo = defaults.lora
        with gr.Row():
            r = gr.Number(value=lo.r, label="LoRA rank", precision=0, info=field_help("lora.r"))
            alpha = gr.Number(value=lo.alpha, label="LoRA alpha", precision=0, info=field_help("lora.alpha"))
            dropout = gr.Number(value=lo.dropout, label="LoRA dropout", info=field_help("lora.dropout"))
            targets = gr.Textbox(value=lo.targets, label="LoRA targets", info=field_help("lora.targets"))
            eval_fraction = gr.Number(value=defaults.data.eval_fraction, label="Eval fraction",
                                      info=field_help("data.eval_fraction"))
    with gr.Row():
        train_btn = gr.Button("Train", variant="primary", elem_id="train-button")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-button", interactive=False)
    status = gr.Markdown("No training yet.", elem_id="train-status")
    progress = gr.HTML(_progress_html(JobView()), elem_id="train-progress")
    with gr.Row():
        loss_plot = gr.Plot(elem_id="loss-plot", label="Loss")
        memory_plot = gr.Plot(elem_id="memory-plot", label="Memory")
    log_scale = gr.Checkbox(False, label="Log-scale loss axis", elem_id="loss-log-scale")
    with gr.Accordion("Same run from the command line", open=False):
        cli = gr.Code(language="shell", elem_id="train-cli", interactive=False)
    timer = gr.Timer(POLL_SECONDS)
    shown = gr.State(None)  # what this browser tab last drew; skip redraws when nothing changed

    form = [model, method, epochs, max_steps, lr, batch, max_len, r, alpha, dropout, targets, eval_fraction]

    def to_config(path, pairs, model, method, epochs, max_steps, lr, batch, max_len, r, alpha, dropout, targets, ev):
        return RunConfig.from_dict({
            "model": model, "method": method,
            "data": {"path": path or "", "mapping": pairs or "", "max_length": max_len, "eval_fraction": ev},
            "lora": {"r": r, "alpha": alpha, "dropout": dropout, "targets": targets},
            "training": {"epochs": epochs, "max_steps": max_steps, "learning_rate": lr, "batch_size": batch},
        })

    def start(path, pairs, *values):
        if not path:
            gr.Warning("Upload a dataset on the Data tab first.")
            return "**Upload a dataset on the Data tab first.**", gr.skip()
        try:
            cfg = to_config(path, pairs, *values)
            studio.start_training(cfg)
        except ConfigError as exc:
            problems = "\n".join(f"- {p}" for p in exc.problems)
            return f"**Fix these settings first:**\n{problems}", gr.skip()
        except RuntimeError as exc:
            gr.Warning(str(exc))
            return f"**{exc}**", gr.skip()
        return "Starting...", command_for(cfg)

    def show_cli(path, pairs, *values):
        try:
            return command_for(to_config(path, pairs, *values))
        except ConfigError:
            return gr.skip()

    def poll(last, log):
        view = studio.job_view()
        key = (view.run_id, view.state, view.message, len(view.train), len(view.evals), log)
        if key == last:
            return (gr.skip(),) * 7
        return (view.progress_text(), _progress_html(view), loss_figure(view.train, view.evals, log),
                memory_figure(view.train), key, gr.Button(interactive=not view.active),
                gr.Button(interactive=view.active and view.state != "stopping"))

    train_btn.click(start, inputs=[dataset_path, mapping, *form], outputs=[status, cli])
    def stop():
        if not studio.stop_training():
            gr.Info("No training is running.")

    stop_btn.click(stop)
    timer.tick(poll, inputs=[shown, log_scale], outputs=[status, progress, loss_plot, memory_plot, shown,
                                                          train_btn, stop_btn], show_progress="hidden")
    for comp in form:
        comp.change(show_cli, inputs=[dataset_path, mapping, *form], outputs=cli, show_progress="hidden")
    return TrainControls(model, max_len)
