"""Plotly figure builders for the live training view (no gradio here; the tabs place them)."""

from __future__ import annotations

import plotly.graph_objects as go

from studio.planning.planner import METHOD_NAMES, TIGHT_SHARE
from studio.runs.records import EvalRecord, TrainRecord

_LAYOUT = dict(
    height=300, margin=dict(l=50, r=20, t=40, b=40), template="plotly_white", legend=dict(orientation="h", y=1.12, x=0)
)


def smooth(values: list[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average, debiased like TensorBoard's so early points are not dragged to 0."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def loss_figure(train: list[TrainRecord], evals: list[EvalRecord], log_scale: bool = False) -> go.Figure:
    fig = go.Figure()
    steps = [m.step for m in train]
    losses = [m.loss for m in train]
    fig.add_trace(
        go.Scatter(
            x=steps,
            y=losses,
            mode="lines+markers",
            name="loss",
            line=dict(color="rgba(99,110,250,0.45)"),
            marker=dict(size=4),
        )
    )
    if len(losses) > 2:
        fig.add_trace(
            go.Scatter(
                x=steps, y=smooth(losses), mode="lines", name="smoothed", line=dict(color="rgb(99,110,250)", width=2.5)
            )
        )
    if evals:
        fig.add_trace(
            go.Scatter(
                x=[m.step for m in evals],
                y=[m.eval_loss for m in evals],
                mode="lines+markers",
                name="eval loss",
                line=dict(color="rgb(239,85,59)"),
                marker=dict(size=8),
            )
        )
    fig.update_layout(title="Loss", xaxis_title="step", yaxis_title="loss", **_LAYOUT)
    if log_scale:
        fig.update_yaxes(type="log")
    _reward_accuracy(fig, train, evals)
    return fig


def _reward_accuracy(fig: go.Figure, train: list[TrainRecord], evals: list[EvalRecord]) -> None:
    """A preference run (dpo, orpo): how often the chosen answer out-scores the rejected one, on
    the training pairs and the held-out pairs, on a 0-1 axis of its own at the right."""
    points = [(m.step, m.extra["reward_accuracy"]) for m in train if "reward_accuracy" in m.extra]
    held = [(m.step, m.extra["reward_accuracy"]) for m in evals if "reward_accuracy" in m.extra]
    if not points and not held:
        return
    if len(points) > 2:
        fig.add_trace(
            go.Scatter(
                x=[s for s, _ in points],
                y=smooth([a for _, a in points]),
                mode="lines",
                name="reward accuracy (train, smoothed)",
                line=dict(color="rgb(0,160,120)", width=2, dash="dot"),
                yaxis="y2",
            )
        )
    if held:
        fig.add_trace(
            go.Scatter(
                x=[s for s, _ in held],
                y=[a for _, a in held],
                mode="lines+markers",
                name="reward accuracy (held-out)",
                line=dict(color="rgb(0,160,120)"),
                marker=dict(size=8, symbol="diamond"),
                yaxis="y2",
            )
        )
    fig.update_layout(
        yaxis2=dict(title="reward accuracy", overlaying="y", side="right", range=[0, 1.02], showgrid=False)
    )


def memory_figure(
    train: list[TrainRecord], check_peak_mib: float | None = None, estimate_mib: float | None = None
) -> go.Figure:
    """Memory per step, with the pre-run memory check's measured peak (the run's longest batch
    was the check's, so the run should stay under it) and the estimate drawn as lines."""
    fig = go.Figure()
    steps = [m.step for m in train]
    series = [
        ("rss_mib", "process RSS"),
        ("cuda_allocated_mib", "CUDA allocated"),
        ("cuda_reserved_mib", "CUDA reserved"),
    ]
    for key, name in series:
        if train and key in train[-1].extra:
            fig.add_trace(
                go.Scatter(
                    x=steps, y=[m.extra.get(key) for m in train], mode="lines+markers", name=name, marker=dict(size=4)
                )
            )
    if not fig.data:
        fig.add_trace(go.Scatter(x=[], y=[], mode="lines", name="process RSS"))
    if check_peak_mib:
        fig.add_hline(
            y=check_peak_mib,
            line_dash="dash",
            line_color="rgb(239,85,59)",
            annotation_text=f"memory check peak {check_peak_mib:,.0f} MiB",
            annotation_position="bottom right",
        )
    if estimate_mib:
        fig.add_hline(
            y=estimate_mib,
            line_dash="dot",
            line_color="rgb(99,110,250)",
            annotation_text=f"estimate {estimate_mib:,.0f} MiB",
            annotation_position="top left",
        )
    fig.update_layout(title="Memory", xaxis_title="step", yaxis_title="MiB", **_LAYOUT)
    return fig


def length_histogram(lengths: list[int], max_length: int) -> go.Figure:
    """Token lengths per row, with the max length drawn: bars right of the line get cut."""
    fig = go.Figure(
        go.Histogram(x=lengths, nbinsx=min(60, max(10, len(set(lengths)))), name="rows", marker_color="rgb(99,110,250)")
    )
    fig.add_vline(
        x=max_length,
        line_dash="dash",
        line_color="rgb(239,85,59)",
        annotation_text=f"max length {max_length}",
        annotation_position="top left",
    )
    fig.update_layout(
        title="Tokens per row", xaxis_title="tokens", yaxis_title="rows", **{**_LAYOUT, "legend": dict(visible=False)}
    )
    return fig


PART_LABELS = {
    "base_weights": "base weights",
    "adapter_weights": "adapter weights",
    "gradients": "gradients",
    "optimizer_state": "optimizer state",
    "optimizer_step_temp": "optimizer step (temporary)",
    "activations": "activations",
    "logits": "logits",
    "allocator_retention": "freed but still resident (glibc)",
    "reference_weights": "DPO reference (frozen copy)",
    "reference_pass": "reference log-probs (dpo, kto)",
    "gathered_weights": "gathered weights (FSDP)",
    "runtime_overhead": "runtime overhead",
}
PART_COLORS = {
    "base_weights": "#6366f1",
    "adapter_weights": "#22c55e",
    "gradients": "#f59e0b",
    "optimizer_state": "#ef4444",
    "optimizer_step_temp": "#fca5a5",
    "activations": "#06b6d4",
    "logits": "#a855f7",
    "allocator_retention": "#67e8f9",
    "reference_weights": "#a5b4fc",
    "reference_pass": "#d8b4fe",
    "gathered_weights": "#c4b5fd",
    "runtime_overhead": "#9ca3af",
}


def memory_plan_figure(plan) -> go.Figure:
    """One stacked bar per method (its estimate's breakdown) against the memory available."""
    gib = 1024**3
    methods = [m for m in plan.methods if m.estimate is not None]
    fig = go.Figure()
    for part, label in PART_LABELS.items():
        values = [m.estimate.breakdown.get(part, 0) / gib for m in methods]
        if any(values):
            fig.add_trace(
                go.Bar(
                    y=[METHOD_NAMES[m.method] for m in methods],
                    x=values,
                    name=label,
                    orientation="h",
                    marker_color=PART_COLORS[part],
                    hovertemplate=f"{label}: %{{x:.2f}} GiB<extra></extra>",
                )
            )
    avail = plan.available_bytes / gib
    fig.add_vline(
        x=avail,
        line_color="#111827",
        line_width=2,
        annotation_text=f"available {avail:.1f} GiB",
        annotation_position="top",
    )
    fig.add_vline(
        x=TIGHT_SHARE * avail,
        line_dash="dot",
        line_color="#6b7280",
        annotation_text=f"{TIGHT_SHARE:.0%}",
        annotation_position="bottom left",
    )
    top = max([avail] + [m.estimate.total_bytes / gib for m in methods]) * 1.08
    fig.update_layout(
        barmode="stack",
        title="Estimated peak memory",
        xaxis_title="GiB",
        **{**_LAYOUT, "height": 260, "legend": dict(orientation="h", y=-0.35, x=0)},
    )
    fig.update_xaxes(range=[0, top])
    fig.update_yaxes(autorange="reversed")
    return fig


def overlay_figure(curves: dict[str, tuple[list[TrainRecord], list[EvalRecord]]], log_scale: bool = False) -> go.Figure:
    """Several runs' smoothed training loss (and eval loss points) on one plot."""
    fig = go.Figure()
    for n, (run_id, (train, evals)) in enumerate(curves.items()):
        color = _PALETTE[n % len(_PALETTE)]
        if train:
            fig.add_trace(
                go.Scatter(
                    x=[m.step for m in train],
                    y=smooth([m.loss for m in train]),
                    mode="lines",
                    name=run_id,
                    line=dict(color=color, width=2),
                )
            )
        if evals:
            fig.add_trace(
                go.Scatter(
                    x=[m.step for m in evals],
                    y=[m.eval_loss for m in evals],
                    mode="markers",
                    name=f"{run_id} eval",
                    marker=dict(color=color, size=9, symbol="diamond"),
                )
            )
    fig.update_layout(
        title="Loss (smoothed) by run", xaxis_title="step", yaxis_title="loss", **{**_LAYOUT, "height": 340}
    )
    if log_scale:
        fig.update_yaxes(type="log")
    return fig


_PALETTE = ["#6366f1", "#ef4444", "#22c55e", "#f59e0b", "#06b6d4", "#a855f7", "#64748b"]
