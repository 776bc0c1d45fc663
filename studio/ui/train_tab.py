"""Train tab: model, method and hyperparameters; Train/Stop; live progress, loss and memory.

The settings are a declared form (:class:`Form`): each is added once by its RunConfig dotted
name, and the config, the command-line box and a suggested change are built from that mapping by
name, never by position. Handlers are module functions of the ``Studio`` and the tab's
components (:class:`TrainTab`), so tests can call them without a browser.

The job belongs to the server (``studio.jobs``); this tab only polls it with a gr.Timer, so
reloading the page or opening a second tab shows the same running job.
"""

from __future__ import annotations

import functools
import html
from dataclasses import dataclass
from typing import Callable

import gradio as gr

from studio.config import (
    LR_SCHEDULERS,
    METHODS,
    OBJECTIVES,
    OPTIMIZERS,
    PACKING,
    ConfigError,
    RunConfig,
    command_for,
    launch_command_for,
    learning_rate_for,
)
from studio.formatting import format_bytes
from studio.models import ModelError
from studio.planning.planner import METHOD_NAMES
from studio.runs import versions
from studio.runs.records import Retry
from studio.service import JobView, Studio
from studio.ui.form import Form
from studio.ui.past_runs import PastRuns, build_past_runs, refreshed
from studio.ui.plots import loss_figure, memory_figure, memory_plan_figure
from studio.ui.views import progress_markdown, resumable_choices

POLL_SECONDS = 0.5
# Every re-plan runs in one queue, one at a time and in order: a slow plan (a cold server reading
# the default model on page load) must never land after, and overwrite, the plan for a newer setting.
PLAN_EVENT = {"show_progress": "hidden", "concurrency_id": "memory-plan", "concurrency_limit": 1}
# Settings that move the memory estimate: changing one re-plans (the model box re-plans on leave).
PLANNED = (
    "method",
    "training.batch_size",
    "data.max_length",
    "lora.r",
    "lora.dropout",
    "lora.targets",
    "training.gradient_accumulation",
    "training.gradient_checkpointing",
    "training.optimizer",
    "training.packing",
)


@dataclass
class TrainTab:
    """The tab's components that handlers read or update, by name."""

    form: Form
    dataset_path: gr.State
    mapping: gr.State
    plan_html: gr.HTML
    plan_plot: gr.Plot
    plan_state: gr.State
    use_recommended: gr.Button
    apply_fix: gr.Button
    train_btn: gr.Button
    stop_btn: gr.Button
    save_btn: gr.Button
    cancel_btn: gr.Button
    resume_run: gr.Dropdown
    resume_btn: gr.Button
    status: gr.Markdown
    retry_btn: gr.Button
    retry_state: gr.State
    progress: gr.HTML
    loss_plot: gr.Plot
    memory_plot: gr.Plot
    log_scale: gr.Checkbox
    cli: gr.Code
    past: PastRuns
    shown: gr.State
    continue_steps: gr.Number  # a finished run's new total (Continue training)

    @property
    def inputs(self) -> set:
        """What the config is built from: the form plus the Data tab's file and column mapping."""
        return {self.dataset_path, self.mapping, *self.form.components}

    @property
    def plan_outputs(self) -> list:
        return [self.plan_html, self.plan_plot, self.plan_state, self.use_recommended, self.apply_fix]


@dataclass
class TrainControls:
    """Controls other tabs read: the Data tab counts tokens with this model and max length."""

    model: gr.Textbox
    max_length: gr.Number
    show_plan: Callable  # re-plan memory: the page runs it on load
    plan_inputs: set
    plan_outputs: list
    tab: TrainTab  # every component, for tests that call the handlers


def _progress_html(view: JobView) -> str:
    pct = 100 * view.step / view.total_steps if view.total_steps else 0
    return (
        f'<div class="fs-progress" data-step="{view.step}" data-total="{view.total_steps}">'
        f'<div class="fs-progress-bar" style="width:{pct:.1f}%"></div></div>'
    )


def build_train_tab(studio: Studio, dataset_path: gr.State, mapping: gr.State) -> TrainControls:
    hw = studio.hardware
    four_bit = "; ".join(f"QLoRA on {d.upper()}: {why}" for d, why in hw.bnb_4bit.items())
    gr.Markdown(f"**Hardware:** {hw.summary()}  \n{four_bit}", elem_id="hardware-summary")
    form = Form()
    with gr.Row():
        form.add(
            "model",
            "Model",
            elem_id="model-name",
            scale=2,
            info="default = SmolLM2-135M-Instruct (bundled, works offline); or a hub id or local folder.",
        )
        form.add("method", "Method", functools.partial(gr.Radio, list(METHODS)), elem_id="method-picker", scale=2)
    with gr.Row():
        objectives = functools.partial(gr.Radio, list(OBJECTIVES))
        form.add("training.objective", "Objective", objectives, elem_id="train-objective", scale=2)
        form.add("training.beta", "DPO beta", elem_id="train-beta")
        form.add("training.orpo_lambda", "ORPO lambda", elem_id="train-orpo-lambda")
    with gr.Row():
        form.add("training.epochs", "Epochs", minimum=0)
        form.add("training.max_steps", "Max steps", elem_id="train-max-steps", minimum=0)
        form.add("training.learning_rate", "Learning rate", elem_id="train-lr")
        form.add("training.lr_scheduler", "LR schedule", functools.partial(gr.Dropdown, list(LR_SCHEDULERS)))
        form.add("training.batch_size", "Batch size", minimum=1, elem_id="train-batch-size")
        form.add("data.max_length", "Max length (tokens)", elem_id="train-max-length")
    with gr.Accordion("LoRA and evaluation", open=False):
        with gr.Row():
            form.add("lora.r", "LoRA rank")
            form.add("lora.alpha", "LoRA alpha")
            form.add("lora.dropout", "LoRA dropout")
            form.add("lora.targets", "LoRA targets")
            form.add("data.eval_fraction", "Eval fraction")
            form.add("training.eval_steps", "Eval every N steps", minimum=0, elem_id="train-eval-steps")
            form.add(
                "training.early_stopping", "Early stopping (evaluations)", minimum=0, elem_id="train-early-stopping"
            )
    with gr.Row():
        form.add("training.gradient_accumulation", "Gradient accumulation", minimum=1, elem_id="train-accumulation")
        form.add("training.max_grad_norm", "Max gradient norm", minimum=0)
        form.add("training.gradient_checkpointing", "Gradient checkpointing", elem_id="train-checkpointing")
        form.add("training.memory_check", "Check memory before training", elem_id="train-memory-check")
        form.add("training.compile", "Compile (faster long runs)", elem_id="train-compile")
    with gr.Row():
        optimizer = functools.partial(gr.Dropdown, list(OPTIMIZERS))
        form.add("training.optimizer", "Optimizer", optimizer, elem_id="train-optimizer")
        form.add("training.packing", "Packing", functools.partial(gr.Radio, list(PACKING)), elem_id="train-packing")
    with gr.Accordion("Memory: which method fits", open=True):
        plan_html = gr.HTML(elem_id="memory-plan")
        with gr.Row():
            use_recommended = gr.Button(
                "Use the recommended method", size="sm", elem_id="plan-use-recommended", visible=False
            )
            apply_fix = gr.Button("Apply the suggested change", size="sm", elem_id="plan-apply", visible=False)
        plan_plot = gr.Plot(elem_id="memory-bar", label="Estimated peak memory")
    plan_state = gr.State(None)  # the last plan's recommendation and suggestion, for the buttons
    with gr.Row():
        train_btn = gr.Button("Train", variant="primary", elem_id="train-button")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-button", interactive=False)
        save_btn = gr.Button("Save checkpoint now", elem_id="save-now-button", interactive=False)
        cancel_btn = gr.Button("Cancel queued runs", elem_id="cancel-queued-button", visible=False)
    with gr.Row():
        resume_run = gr.Dropdown(
            label="Resume an interrupted or stopped run, or continue a finished one",
            elem_id="resume-run",
            scale=3,
            choices=resumable_choices(studio),
            value=None,
            info="Continues from its last checkpoint with its own settings, to its final step; a finished "
            "run trains on to the new total, with a short warm-up, then its own decay over the added steps.",
        )
        continue_steps = gr.Number(
            label="Continue to (total steps)",
            elem_id="continue-steps",
            precision=0,
            # No `minimum`: with it, Resume on a stopped run (the box left empty) failed in the
            # browser with a bare "Error" before the handler ran; resume() checks the total itself.
            scale=1,
            info="For a finished run only: more than its final step.",
        )
        resume_btn = gr.Button("Resume", elem_id="resume-button", scale=1)
    continue_note = gr.Markdown("", elem_id="continue-note")
    status = gr.Markdown("No training yet.", elem_id="train-status")
    retry_btn = gr.Button("Retry with the suggested change", elem_id="retry-button", variant="primary", visible=False)
    retry_state = gr.State(None)  # the failed run's suggested change
    progress = gr.HTML(_progress_html(JobView()), elem_id="train-progress")
    with gr.Row():
        loss_plot = gr.Plot(elem_id="loss-plot", label="Loss")
        memory_plot = gr.Plot(elem_id="memory-plot", label="Memory")
    log_scale = gr.Checkbox(False, label="Log-scale loss axis", elem_id="loss-log-scale")
    with gr.Accordion("Same run from the command line", open=False):
        cli = gr.Code(language="shell", elem_id="train-cli", interactive=False)
    past = build_past_runs(studio, log_scale)
    timer = gr.Timer(POLL_SECONDS)
    shown = gr.State(None)  # what this browser tab last drew; skip redraws when nothing changed

    tab = TrainTab(
        form,
        dataset_path,
        mapping,
        plan_html,
        plan_plot,
        plan_state,
        use_recommended,
        apply_fix,
        train_btn,
        stop_btn,
        save_btn,
        cancel_btn,
        resume_run,
        resume_btn,
        status,
        retry_btn,
        retry_state,
        progress,
        loss_plot,
        memory_plot,
        log_scale,
        cli,
        past,
        shown,
        continue_steps,
    )
    bind = functools.partial  # handlers are module functions of (studio, tab, ...)
    fields, lr = form.fields, form.fields["training.learning_rate"]

    train_btn.click(bind(start, studio, tab), inputs=tab.inputs, outputs=[status, cli])
    stop_btn.click(bind(stop, studio))
    cancel_btn.click(bind(cancel_queued, studio))
    save_btn.click(bind(save_now, studio))
    resume_btn.click(bind(resume, studio), inputs=[resume_run, continue_steps], outputs=status)
    resume_run.change(bind(continue_disk_note, studio), inputs=resume_run, outputs=continue_note)
    timer.tick(
        bind(poll, studio, tab),
        inputs=[shown, log_scale],
        outputs=[
            status,
            progress,
            loss_plot,
            memory_plot,
            shown,
            train_btn,
            stop_btn,
            save_btn,
            resume_run,
            resume_btn,
            retry_btn,
            retry_state,
            *past.components,
            cancel_btn,
        ],
        show_progress="hidden",
    )
    for comp in form.components:
        comp.change(bind(show_cli, tab), inputs=tab.inputs, outputs=cli, show_progress="hidden")

    show = bind(show_plan, studio, tab)
    # The model box re-plans when left or submitted, not per keystroke (reading a config can be slow).
    fields["model"].submit(show, inputs=tab.inputs, outputs=tab.plan_outputs, **PLAN_EVENT)
    fields["model"].blur(show, inputs=tab.inputs, outputs=tab.plan_outputs, **PLAN_EVENT)
    for comp in (*(fields[name] for name in PLANNED), dataset_path, mapping):
        comp.change(show, inputs=tab.inputs, outputs=tab.plan_outputs, **PLAN_EVENT)

    use_recommended.click(bind(use_recommendation, tab), inputs=[plan_state, lr], outputs=[fields["method"], lr])
    # One click: apply the change the failure suggested to the form, then train with it.
    retry_btn.click(bind(apply_change, tab), inputs=[retry_state, lr], outputs=form.components).then(
        bind(start, studio, tab), inputs=tab.inputs, outputs=[status, cli]
    )
    apply_fix.click(bind(apply_plan_fix, tab), inputs=[plan_state, lr], outputs=form.components)
    return TrainControls(fields["model"], fields["data.max_length"], show, tab.inputs, tab.plan_outputs, tab)


# ---- handlers: module functions of the Studio and the tab's components ------------------------


def form_config(tab: TrainTab, data: dict) -> RunConfig:
    """The RunConfig the form describes, from an event's ``{component: value}``.
    Raises ConfigError (a box emptied or holding the wrong type is reported, not defaulted)."""
    values = {
        **tab.form.values(data),
        "data.path": data[tab.dataset_path] or "",
        "data.mapping": data[tab.mapping] or "",
    }
    return RunConfig().with_overrides(values, skip_none=False)


def show_plan(studio: Studio, tab: TrainTab, data: dict) -> dict:
    """Re-plan on every change that moves memory; problems show in place of the table."""

    def problems_shown(problems: list[str]) -> dict:
        return {
            tab.plan_html: _problems_html(problems),
            tab.plan_plot: None,
            tab.plan_state: None,
            tab.use_recommended: gr.Button(visible=False),
            tab.apply_fix: gr.Button(visible=False),
        }

    try:
        cfg = form_config(tab, data)
        problems = cfg.validate(check_data_file=False)
        if problems:
            return problems_shown(problems)
        plan, basis = studio.memory_plan(cfg)
    except ConfigError as exc:
        return problems_shown(exc.problems)
    except ModelError as exc:
        return problems_shown([str(exc)])
    rec = plan.recommended
    return {
        tab.plan_html: plan_table_html(plan, cfg.method, basis),
        tab.plan_plot: memory_plan_figure(plan),
        tab.plan_state: {"recommended": rec, "fix": plan.suggestion.as_retry() if plan.suggestion else None},
        tab.use_recommended: gr.Button(
            visible=bool(rec and rec != cfg.method),
            value=f"Use {METHOD_NAMES[rec]}" if rec else "Use the recommended method",
        ),
        tab.apply_fix: gr.Button(visible=plan.suggestion is not None),
    }


def start(studio: Studio, tab: TrainTab, data: dict):
    """Train (or queue) the run the form describes: returns (status markdown, command box)."""
    if not data[tab.dataset_path]:
        gr.Warning("Upload a dataset on the Data tab first.")
        return "**Upload a dataset on the Data tab first.**", gr.skip()
    try:
        cfg = form_config(tab, data)
        job = studio.start_training(cfg)
    except ConfigError as exc:
        problems = "\n".join(f"- {p}" for p in exc.problems)
        return f"**Fix these settings first:**\n{problems}", gr.skip()
    except RuntimeError as exc:
        gr.Warning(str(exc))
        return f"**{exc}**", gr.skip()
    position = studio.queue_position(job)
    if position:
        gr.Info(f"Queued at position {position}: it starts by itself when the runs before it end.")
        return f"Queued `{job.run.id}` at position {position}.", _commands(cfg)
    return "Starting...", _commands(cfg)


def show_cli(tab: TrainTab, data: dict):
    try:
        return _commands(form_config(tab, data))
    except ConfigError:
        return gr.skip()


def poll(studio: Studio, tab: TrainTab, last, log) -> dict:
    """Redraw what the server's job changed since this browser tab last drew (nothing otherwise)."""
    view = studio.job_view()
    key = (view.run_id, view.state, view.message, len(view.train), len(view.evals), log, tuple(view.queued))
    if key == last:  # nothing to redraw (an empty dict would read as one value, not as no updates)
        return {tab.shown: gr.skip()}
    running = view.active and view.state != "stopping"
    out = {
        tab.status: progress_markdown(view),
        tab.progress: _progress_html(view),
        tab.loss_plot: loss_figure(view.train, view.evals, log),
        tab.memory_plot: memory_figure(view.train, view.memory_peak_mib, view.memory_estimate_mib),
        tab.shown: key,
        tab.train_btn: gr.Button(value="Queue another run" if view.active else "Train"),
        tab.stop_btn: gr.Button(interactive=running),
        tab.save_btn: gr.Button(interactive=running),
        tab.resume_btn: gr.Button(interactive=not view.active),
        tab.cancel_btn: gr.Button(visible=bool(view.queued)),
    }
    out |= {tab.retry_btn: gr.Button(visible=view.retry is not None), tab.retry_state: view.retry}
    # The run lists change only when a job changes state: refresh them then.
    if key[:3] != (last or (None,) * 3)[:3] or key[-1] != (last or (None,) * 7)[-1]:
        out |= {tab.resume_run: gr.Dropdown(choices=resumable_choices(studio))} | refreshed(studio, tab.past)
    return out


def switch_lr(current_lr, new_method):
    """When a button switches method, the learning rate follows (config.learning_rate_for)."""
    new_lr = learning_rate_for(new_method, current_lr)
    return gr.skip() if new_lr == current_lr else new_lr


def use_recommendation(tab: TrainTab, kept, current_lr) -> dict:
    """The plan's recommended method, with the learning rate that goes with it."""
    method, lr = tab.form.fields["method"], tab.form.fields["training.learning_rate"]
    if not kept or not kept.get("recommended"):
        return {method: gr.skip(), lr: gr.skip()}
    return {method: gr.Radio(value=kept["recommended"]), lr: switch_lr(current_lr, kept["recommended"])}


def apply_plan_fix(tab: TrainTab, kept, current_lr) -> dict:
    """The memory plan's suggested change, applied like a failed run's retry."""
    return apply_change(tab, (kept or {}).get("fix"), current_lr)


def apply_change(tab: TrainTab, retry: Retry | None, current_lr) -> dict:
    """Set the suggested method and settings by name; each control's change event then re-plans."""
    if retry is None or not retry.changes:
        return {tab.form.fields["method"]: gr.skip()}
    fields = tab.form.fields
    return {
        fields["method"]: gr.Radio(value=retry.method),
        fields["training.learning_rate"]: switch_lr(current_lr, retry.method),
        **tab.form.updates(retry.changes),
    }


def resume(studio: Studio, run_id, total=None):
    """Resume the picked run; a finished one continues to ``total`` steps (Continue training)."""
    if not run_id:
        gr.Warning("Pick a run to resume.")
        return gr.skip()
    finished = {run.id: step for run, step in studio.resumable_runs() if run.is_continuable()}
    if run_id in finished and not (total and int(total) > finished[run_id]):
        msg = f"Run {run_id} finished at step {finished[run_id]}: type a new total above it in Continue to."
        gr.Warning(msg)
        return f"**{msg}**"
    try:
        studio.resume_training(run_id, int(total) if run_id in finished else None)
    except (LookupError, ConfigError, RuntimeError) as exc:
        gr.Warning(str(exc))
        return f"**{exc}**"
    return f"Continuing {run_id} to {int(total)} steps..." if run_id in finished else f"Resuming {run_id}..."


def continue_disk_note(studio: Studio, run_id: str | None) -> str:
    """Before a finished run is continued: the version it will save and the disk that takes (a
    full fine-tune's version is a whole model), and how many versions the run keeps."""
    if not run_id:
        return ""
    try:
        run = studio.run(run_id)
        kept = run.versions()
        if not run.is_continuable() or not kept:
            return ""
        cfg = run.config()
    except (LookupError, ValueError, OSError):
        return ""
    keep = cfg.training.keep_versions or versions.default_keep(cfg.method)
    latest = kept[-1]
    what = "a whole model" if cfg.method == "full" else "an adapter"
    return (
        f"Continuing saves **v{latest.number + 1}**, {what} of about **{format_bytes(latest.disk_bytes())}** "
        f"(the size of v{latest.number}); this run keeps its latest {keep} versions "
        f"(`training.keep_versions`), {len(kept)} kept now using {format_bytes(sum(v.disk_bytes() for v in kept))}."
    )


def save_now(studio: Studio):
    gr.Info("A checkpoint will be saved after the current step." if studio.save_now() else "No training is running.")


def stop(studio: Studio):
    if not studio.stop_training():
        gr.Info("No training is running.")


def cancel_queued(studio: Studio):
    dropped = studio.cancel_queued()
    gr.Info(
        f"Cancelled {len(dropped)} queued run{'s' if len(dropped) != 1 else ''}." if dropped else "Nothing is queued."
    )


VERDICTS = {
    "fits": ("fits", "fs-fits"),
    "tight": ("tight", "fs-tight"),
    "no": ("does not fit", "fs-nofit"),
    "n/a": ("cannot run here", "fs-na"),
}


def _commands(cfg) -> str:
    return (
        f"{command_for(cfg)}\n\n# the same run on several GPUs, e.g. 4, a full copy on each (DDP):\n"
        f"{launch_command_for(cfg, 4)}\n\n# or sharded across them (FSDP), for a model too big for one GPU:\n"
        f"{launch_command_for(cfg, 4, sharded=True)}"
    )


def _problems_html(problems: list[str]) -> str:
    items = "".join(f"<li>{html.escape(p)}</li>" for p in problems)
    return f'<div class="fs-plan-problems">Fix these settings to see the memory estimate:<ul>{items}</ul></div>'


def plan_table_html(plan, chosen: str, basis: str) -> str:
    """The plan as a table: one row per method, the chosen one marked, then the recommendation."""
    rows = []
    for m in plan.methods:
        label, css = VERDICTS[m.verdict]
        est = m.estimate
        if est is None:
            cells = f'<td colspan="3">{html.escape(m.reason)}</td>'
        else:
            pct = est.trainable_params / est.total_params
            cells = (
                f"<td>{format_bytes(est.total_bytes, 2)} ({m.share:.0%})</td>"
                f"<td>{est.trainable_params:,} ({pct:.2%})</td><td>{format_bytes(est.adapter_bytes, 2)}</td>"
            )
        mark = " fs-chosen" if m.method == chosen else ""
        rows.append(
            f'<tr class="fs-plan-row{mark}" data-method="{m.method}" data-verdict="{m.verdict}">'
            f"<td>{METHOD_NAMES[m.method]}{' (chosen)' if mark else ''}</td>"
            f'<td><span class="fs-verdict {css}">{label}</span></td>{cells}</tr>'
        )
    where = "GPU" if plan.device == "cuda" else plan.device.upper()
    available = format_bytes(plan.available_bytes, 2)
    head = f'<div class="fs-plan-basis">{html.escape(basis)} Available on {where}: {available}.</div>'
    table = (
        '<table class="fs-plan"><thead><tr><th>Method</th><th>Verdict</th><th>Estimated peak</th>'
        "<th>Trainable parameters</th><th>Saved size</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )
    rec = (
        f'<div class="fs-plan-rec" data-recommended="{plan.recommended or ""}"><b>Recommended:</b> '
        f"{html.escape(plan.recommendation)}</div>"
    )
    fix = (
        f'<div class="fs-plan-fix"><b>Suggestion:</b> {html.escape(plan.suggestion.text)}</div>'
        if plan.suggestion
        else ""
    )
    return head + table + rec + fix
