"""Train tab: model, method and hyperparameters; Train/Stop; live progress, loss and memory.

The job belongs to the server (``studio.jobs``); this tab only polls it with a gr.Timer, so
reloading the page or opening a second tab shows the same running job.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Callable

import gradio as gr

from studio.config import ConfigError, RunConfig, command_for, field_help, launch_command_for
from studio.models import ModelError
from studio.planner import METHOD_NAMES
from studio.service import JobView, Studio
from studio.ui.plots import loss_figure, memory_figure, memory_plan_figure, overlay_figure

POLL_SECONDS = 0.5
LORA_LR, FULL_LR = RunConfig().training.learning_rate, 2e-5


def _progress_html(view: JobView) -> str:
    pct = 100 * view.step / view.total_steps if view.total_steps else 0
    return (f'<div class="fs-progress" data-step="{view.step}" data-total="{view.total_steps}">'
            f'<div class="fs-progress-bar" style="width:{pct:.1f}%"></div></div>')


@dataclass
class TrainControls:
    """Controls other tabs read: the Data tab counts tokens with this model and max length."""

    model: gr.Textbox
    max_length: gr.Number
    show_plan: Callable  # re-plan memory: the page runs it on load
    plan_inputs: list
    plan_outputs: list


def build_train_tab(studio: Studio, dataset_path: gr.State, mapping: gr.State) -> TrainControls:
    defaults = RunConfig()
    hw = studio.hardware
    four_bit = "; ".join(f"QLoRA on {d.upper()}: {why}" for d, why in hw.bnb_4bit.items())
    gr.Markdown(f"**Hardware:** {hw.summary()}  \n{four_bit}", elem_id="hardware-summary")
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
        lr = gr.Number(value=t.learning_rate, label="Learning rate", info=field_help("training.learning_rate"),
                       elem_id="train-lr")
        batch = gr.Number(value=t.batch_size, label="Batch size", precision=0, minimum=1,
                          info=field_help("training.batch_size"), elem_id="train-batch-size")
        max_len = gr.Number(value=defaults.data.max_length, label="Max length (tokens)", precision=0,
                            info=field_help("data.max_length"), elem_id="train-max-length")
    with gr.Accordion("LoRA and evaluation", open=False):
        lo = defaults.lora
        with gr.Row():
            r = gr.Number(value=lo.r, label="LoRA rank", precision=0, info=field_help("lora.r"))
            alpha = gr.Number(value=lo.alpha, label="LoRA alpha", precision=0, info=field_help("lora.alpha"))
            dropout = gr.Number(value=lo.dropout, label="LoRA dropout", info=field_help("lora.dropout"))
            targets = gr.Textbox(value=lo.targets, label="LoRA targets", info=field_help("lora.targets"))
            eval_fraction = gr.Number(value=defaults.data.eval_fraction, label="Eval fraction",
                                      info=field_help("data.eval_fraction"))
            eval_steps = gr.Number(value=t.eval_steps, label="Eval every N steps", precision=0, minimum=0,
                                   elem_id="train-eval-steps", info=field_help("training.eval_steps"))
            early_stopping = gr.Number(value=t.early_stopping, label="Early stopping (evaluations)", precision=0,
                                       minimum=0, elem_id="train-early-stopping",
                                       info=field_help("training.early_stopping"))
    with gr.Row():
        accumulation = gr.Number(value=t.gradient_accumulation, label="Gradient accumulation", precision=0,
                                 minimum=1, elem_id="train-accumulation", info=field_help("training.gradient_accumulation"))
        checkpointing = gr.Checkbox(t.gradient_checkpointing, label="Gradient checkpointing",
                                    elem_id="train-checkpointing", info=field_help("training.gradient_checkpointing"))
        memory_check = gr.Checkbox(t.memory_check, label="Check memory before training",
                                   elem_id="train-memory-check", info=field_help("training.memory_check"))
        compile_ = gr.Checkbox(t.compile, label="Compile (faster long runs)", elem_id="train-compile",
                               info=field_help("training.compile"))
    with gr.Accordion("Memory: which method fits", open=True):
        plan_html = gr.HTML(elem_id="memory-plan")
        with gr.Row():
            use_recommended = gr.Button("Use the recommended method", size="sm", elem_id="plan-use-recommended",
                                        visible=False)
            apply_fix = gr.Button("Apply the suggested change", size="sm", elem_id="plan-apply", visible=False)
        plan_plot = gr.Plot(elem_id="memory-bar", label="Estimated peak memory")
    plan_state = gr.State(None)  # the last plan's recommendation and suggestion, for the buttons
    with gr.Row():
        train_btn = gr.Button("Train", variant="primary", elem_id="train-button")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-button", interactive=False)
        save_btn = gr.Button("Save checkpoint now", elem_id="save-now-button", interactive=False)
        cancel_btn = gr.Button("Cancel queued runs", elem_id="cancel-queued-button", visible=False)
    with gr.Row():
        resume_run = gr.Dropdown(label="Resume an interrupted or stopped run", elem_id="resume-run", scale=3,
                                 choices=studio.resumable_runs(), value=None,
                                 info="Continues from its last checkpoint with its own settings, to its final step.")
        resume_btn = gr.Button("Resume", elem_id="resume-button", scale=1)
    status = gr.Markdown("No training yet.", elem_id="train-status")
    retry_btn = gr.Button("Retry with the suggested change", elem_id="retry-button", variant="primary",
                          visible=False)
    retry_state = gr.State(None)  # the failed run's suggested change
    progress = gr.HTML(_progress_html(JobView()), elem_id="train-progress")
    with gr.Row():
        loss_plot = gr.Plot(elem_id="loss-plot", label="Loss")
        memory_plot = gr.Plot(elem_id="memory-plot", label="Memory")
    log_scale = gr.Checkbox(False, label="Log-scale loss axis", elem_id="loss-log-scale")
    with gr.Accordion("Same run from the command line", open=False):
        cli = gr.Code(language="shell", elem_id="train-cli", interactive=False)
    with gr.Accordion("Past runs: compare curves and settings", open=False):
        runs_table = gr.Dataframe(studio.runs_table(), elem_id="runs-table", interactive=False, wrap=True)
        compare = gr.Dropdown(label="Runs to compare (two or more)", multiselect=True, elem_id="runs-compare",
                              choices=[r.id for r in studio.registry.list()], value=[])
        overlay = gr.Plot(elem_id="runs-overlay", label="Loss by run")
        diff = gr.Markdown(elem_id="runs-diff")
        with gr.Row():
            manage = gr.Dropdown(label="Rename or delete a run", elem_id="runs-manage", scale=2,
                                 choices=[r.id for r in studio.registry.list()], value=None)
            new_name = gr.Textbox(label="New name", elem_id="runs-new-name", scale=2, max_length=80)
            rename_btn = gr.Button("Rename", elem_id="runs-rename", scale=1)
        with gr.Row():
            confirm = gr.Checkbox(label="Yes, delete this run's adapter, checkpoints and metrics for good",
                                  elem_id="runs-confirm-delete", scale=3)
            delete_btn = gr.Button("Delete run", variant="stop", elem_id="runs-delete", scale=1)
        manage_note = gr.Markdown(elem_id="runs-manage-note")
    timer = gr.Timer(POLL_SECONDS)
    shown = gr.State(None)  # what this browser tab last drew; skip redraws when nothing changed

    form = [model, method, epochs, max_steps, lr, batch, max_len, r, alpha, dropout, targets, eval_fraction,
            accumulation, checkpointing, memory_check, eval_steps, early_stopping, compile_]

    def to_config(path, pairs, model, method, epochs, max_steps, lr, batch, max_len, r, alpha, dropout, targets, ev,
                  accumulation, checkpointing, memory_check, eval_steps, early_stopping, compile_):
        return RunConfig.from_dict({
            "model": model, "method": method,
            "data": {"path": path or "", "mapping": pairs or "", "max_length": max_len, "eval_fraction": ev},
            "lora": {"r": r, "alpha": alpha, "dropout": dropout, "targets": targets},
            "training": {"epochs": epochs, "max_steps": max_steps, "learning_rate": lr, "batch_size": batch,
                         "gradient_accumulation": accumulation, "gradient_checkpointing": checkpointing,
                         "memory_check": memory_check, "eval_steps": eval_steps, "early_stopping": early_stopping,
                         "compile": compile_},
        })

    def show_plan(path, pairs, *values):
        """Re-plan on every change that moves memory; problems show in place of the table."""
        hidden = (gr.Button(visible=False), gr.Button(visible=False))
        try:
            cfg = to_config(path, pairs, *values)
            problems = cfg.validate(check_data_file=False)
            if problems:
                return _problems_html(problems), None, None, *hidden
            plan, basis = studio.memory_plan(cfg)
        except ConfigError as exc:
            return _problems_html(exc.problems), None, None, *hidden
        except ModelError as exc:
            return _problems_html([str(exc)]), None, None, *hidden
        keep = {"recommended": plan.recommended,
                "changes": plan.suggestion.changes if plan.suggestion else None,
                "suggested_method": plan.suggestion.method if plan.suggestion else None}
        rec = plan.recommended
        return (plan_table_html(plan, cfg.method, basis), memory_plan_figure(plan), keep,
                gr.Button(visible=bool(rec and rec != cfg.method),
                          value=f"Use {METHOD_NAMES[rec]}" if rec else "Use the recommended method"),
                gr.Button(visible=plan.suggestion is not None))

    def start(path, pairs, *values):
        if not path:
            gr.Warning("Upload a dataset on the Data tab first.")
            return "**Upload a dataset on the Data tab first.**", gr.skip()
        try:
            cfg = to_config(path, pairs, *values)
            job = studio.start_training(cfg)
        except ConfigError as exc:
            problems = "\n".join(f"- {p}" for p in exc.problems)
            return f"**Fix these settings first:**\n{problems}", gr.skip()
        except RuntimeError as exc:
            gr.Warning(str(exc))
            return f"**{exc}**", gr.skip()
        position = studio.jobs.queue_position(job)
        if position:
            gr.Info(f"Queued at position {position}: it starts by itself when the runs before it end.")
            return f"Queued `{job.run.id}` at position {position}.", _commands(cfg)
        return "Starting...", _commands(cfg)

    def show_cli(path, pairs, *values):
        try:
            return _commands(to_config(path, pairs, *values))
        except ConfigError:
            return gr.skip()

    def poll(last, log):
        view = studio.job_view()
        key = (view.run_id, view.state, view.message, len(view.train), len(view.evals), log, tuple(view.queued))
        if key == last:
            return (gr.skip(),) * 16
        running = view.active and view.state != "stopping"
        # The resumable list changes only when a job changes state: refresh it then.
        changed = key[:3] != (last or (None,) * 3)[:3] or key[-1] != (last or (None,) * 7)[-1]
        resumable = gr.Dropdown(choices=studio.resumable_runs()) if changed else gr.skip()
        table = studio.runs_table() if changed else gr.skip()
        run_ids = gr.Dropdown(choices=[r.id for r in studio.registry.list()]) if changed else gr.skip()
        retry = view.retry and {"changes": view.retry["changes"], "suggested_method": view.retry["method"]}
        memory = memory_figure(view.train, view.memory_peak_mib, view.memory_estimate_mib)
        return (view.progress_text(), _progress_html(view), loss_figure(view.train, view.evals, log),
                memory, key, gr.Button(value="Queue another run" if view.active else "Train"),
                gr.Button(interactive=running), gr.Button(interactive=running), resumable,
                gr.Button(interactive=not view.active), gr.Button(visible=bool(retry)), retry, table, run_ids, run_ids,
                gr.Button(visible=bool(view.queued)))

    def compare_runs(run_ids, log):
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

    def after_change(note):
        ids = [r.id for r in studio.registry.list()]
        return (note, studio.runs_table(), gr.Dropdown(choices=ids, value=None),
                gr.Dropdown(choices=ids, value=[]), False)

    def rename(run_id, name):
        if not run_id:
            return "Pick a run to rename.", *(gr.skip(),) * 4
        try:
            name = studio.rename_run(run_id, name)
        except (LookupError, ValueError) as exc:
            return f"**{exc}**", *(gr.skip(),) * 4
        return after_change(f"`{run_id}` is now called **{name}**.")

    def delete(run_id, sure):
        if not run_id:
            return "Pick a run to delete.", *(gr.skip(),) * 4
        if not sure:
            return "Tick the box to confirm: deleting removes the run's files for good.", *(gr.skip(),) * 4
        try:
            studio.delete_run(run_id)
        except (LookupError, ValueError) as exc:
            return f"**{exc}**", *(gr.skip(),) * 4
        return after_change(f"Deleted `{run_id}`.")

    def resume(run_id):
        if not run_id:
            gr.Warning("Pick a run to resume.")
            return gr.skip()
        try:
            studio.resume_training(run_id)
        except (LookupError, ConfigError, RuntimeError) as exc:
            gr.Warning(str(exc))
            return f"**{exc}**"
        return f"Resuming {run_id}..."

    def save_now():
        if studio.save_now():
            gr.Info("A checkpoint will be saved after the current step.")
        else:
            gr.Info("No training is running.")

    train_btn.click(start, inputs=[dataset_path, mapping, *form], outputs=[status, cli])
    def stop():
        if not studio.stop_training():
            gr.Info("No training is running.")

    stop_btn.click(stop)

    def cancel_queued():
        dropped = studio.cancel_queued()
        gr.Info(f"Cancelled {len(dropped)} queued run{'s' if len(dropped) != 1 else ''}." if dropped
                else "Nothing is queued.")

    cancel_btn.click(cancel_queued)
    save_btn.click(save_now)
    compare.change(compare_runs, inputs=[compare, log_scale], outputs=[overlay, diff])
    manage_outputs = [manage_note, runs_table, manage, compare, confirm]
    rename_btn.click(rename, inputs=[manage, new_name], outputs=manage_outputs)
    delete_btn.click(delete, inputs=[manage, confirm], outputs=manage_outputs)
    resume_btn.click(resume, inputs=resume_run, outputs=status)
    timer.tick(poll, inputs=[shown, log_scale], outputs=[status, progress, loss_plot, memory_plot, shown,
                                                          train_btn, stop_btn, save_btn, resume_run, resume_btn,
                                                          retry_btn, retry_state, runs_table, compare, manage,
                                                          cancel_btn],
               show_progress="hidden")
    for comp in form:
        comp.change(show_cli, inputs=[dataset_path, mapping, *form], outputs=cli, show_progress="hidden")

    plan_outputs = [plan_html, plan_plot, plan_state, use_recommended, apply_fix]
    plan_inputs = [dataset_path, mapping, *form]
    # The model box re-plans when left or submitted, not per keystroke (reading a config can be slow).
    model.submit(show_plan, inputs=plan_inputs, outputs=plan_outputs, show_progress="hidden")
    model.blur(show_plan, inputs=plan_inputs, outputs=plan_outputs, show_progress="hidden")
    for comp in (method, batch, max_len, r, dropout, targets, accumulation, checkpointing):
        comp.change(show_plan, inputs=plan_inputs, outputs=plan_outputs, show_progress="hidden")
    dataset_path.change(show_plan, inputs=plan_inputs, outputs=plan_outputs, show_progress="hidden")
    mapping.change(show_plan, inputs=plan_inputs, outputs=plan_outputs, show_progress="hidden")

    def switch_lr(current_lr, new_method):
        """Full fine-tuning wants about a tenth of LoRA's learning rate: when the button switches
        method and the rate is still the other family's default, switch the rate too."""
        if new_method == "full" and current_lr == LORA_LR:
            return FULL_LR
        if new_method != "full" and current_lr == FULL_LR:
            return LORA_LR
        return gr.skip()

    def use_rec(kept, current_lr):
        if not kept or not kept.get("recommended"):
            return gr.skip(), gr.skip()
        return gr.Radio(value=kept["recommended"]), switch_lr(current_lr, kept["recommended"])

    def apply(kept, current_lr):
        """Set the suggested method and settings; each control's change event then re-plans."""
        if not kept or not kept.get("changes"):
            return (gr.skip(),) * 7
        ch, new = kept["changes"], kept["suggested_method"]
        return (gr.Radio(value=new), switch_lr(current_lr, new),
                ch.get("training.batch_size", gr.skip()), ch.get("training.gradient_accumulation", gr.skip()),
                ch.get("training.gradient_checkpointing", gr.skip()), ch.get("data.max_length", gr.skip()),
                ch.get("training.compile", gr.skip()))

    use_recommended.click(use_rec, inputs=[plan_state, lr], outputs=[method, lr])
    # One click: apply the change the failure suggested to the form, then train with it.
    retry_btn.click(apply, inputs=[retry_state, lr],
                    outputs=[method, lr, batch, accumulation, checkpointing, max_len, compile_]).then(
        start, inputs=[dataset_path, mapping, *form], outputs=[status, cli])
    apply_fix.click(apply, inputs=[plan_state, lr],
                    outputs=[method, lr, batch, accumulation, checkpointing, max_len, compile_])
    return TrainControls(model, max_len, show_plan, plan_inputs, plan_outputs)


VERDICTS = {"fits": ("fits", "fs-fits"), "tight": ("tight", "fs-tight"), "no": ("does not fit", "fs-nofit"),
            "n/a": ("cannot run here", "fs-na")}


def _commands(cfg) -> str:
    return (f"{command_for(cfg)}\n\n# the same run on several GPUs (DDP), e.g. 4:\n"
            f"{launch_command_for(cfg, 4)}")


def _cell(value) -> str:
    """A config value inside a markdown table cell: escaped, pipes kept out of the layout."""
    return html.escape(str(value)).replace("|", "&#124;") or "(empty)"


def _problems_html(problems: list[str]) -> str:
    items = "".join(f"<li>{html.escape(p)}</li>" for p in problems)
    return f'<div class="fs-plan-problems">Fix these settings to see the memory estimate:<ul>{items}</ul></div>'


def _size(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.0f} MiB"


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
            cells = (f"<td>{_size(est.total_bytes)} ({m.share:.0%})</td>"
                     f"<td>{est.trainable_params:,} ({pct:.2%})</td><td>{_size(est.adapter_bytes)}</td>")
        mark = " fs-chosen" if m.method == chosen else ""
        rows.append(f'<tr class="fs-plan-row{mark}" data-method="{m.method}" data-verdict="{m.verdict}">'
                    f"<td>{METHOD_NAMES[m.method]}{' (chosen)' if mark else ''}</td>"
                    f'<td><span class="fs-verdict {css}">{label}</span></td>{cells}</tr>')
    where = "GPU" if plan.device == "cuda" else plan.device.upper()
    head = (f'<div class="fs-plan-basis">{html.escape(basis)} Available on {where}: '
            f"{_size(plan.available_bytes)}.</div>")
    table = ('<table class="fs-plan"><thead><tr><th>Method</th><th>Verdict</th><th>Estimated peak</th>'
             "<th>Trainable parameters</th><th>Saved size</th></tr></thead><tbody>"
             + "".join(rows) + "</tbody></table>")
    rec = f'<div class="fs-plan-rec" data-recommended="{plan.recommended or ""}"><b>Recommended:</b> ' \
          f"{html.escape(plan.recommendation)}</div>"
    fix = (f'<div class="fs-plan-fix"><b>Suggestion:</b> {html.escape(plan.suggestion.text)}</div>'
           if plan.suggestion else "")
    return head + table + rec + fix
