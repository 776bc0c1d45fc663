"""Plotly figure builders for the live training view (no gradio here; the tabs place them)."""

from __future__ import annotations

import plotly.graph_objects as go

_LAYOUT = dict(height=300, margin=dict(l=50, r=20, t=40, b=40), template="plotly_white",
               legend=dict(orientation="h", y=1.12, x=0))


def smooth(values: list[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average, debiased like TensorBoard's so early points are not dragged to 0."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def loss_figure(train: list[dict], evals: list[dict], log_scale: bool = False) -> go.Figure:
    fig = go.Figure()
    steps = [m["step"] for m in train]
    losses = [m["loss"] for m in train]
    fig.add_trace(go.Scatter(x=steps, y=losses, mode="lines+markers", name="loss",
                             line=dict(color="rgba(99,110,250,0.45)"), marker=dict(size=4)))
    if len(losses) > 2:
        fig.add_trace(go.Scatter(x=steps, y=smooth(losses), mode="lines", name="smoothed",
                                 line=dict(color="rgb(99,110,250)", width=2.5)))
    if evals:
        fig.add_trace(go.Scatter(x=[m["step"] for m in evals], y=[m["eval_loss"] for m in evals],
                                 mode="lines+markers", name="eval loss",
                                 line=dict(color="rgb(239,85,59)"), marker=dict(size=8)))
    fig.update_layout(title="Loss", xaxis_title="step", yaxis_title="loss", **_LAYOUT)
    if log_scale:
        fig.update_yaxes(type="log")
    return fig


def memory_figure(train: list[dict]) -> go.Figure:
    fig = go.Figure()
    steps = [m["step"] for m in train]
    series = [("rss_mib", "process RSS"), ("cuda_allocated_mib", "CUDA allocated"),
              ("cuda_reserved_mib", "CUDA reserved")]
    for key, name in series:
        if train and key in train[-1]:
            fig.add_trace(go.Scatter(x=steps, y=[m.get(key) for m in train], mode="lines+markers",
                                     name=name, marker=dict(size=4)))
    if not fig.data:
        fig.add_trace(go.Scatter(x=[], y=[], mode="lines", name="process RSS"))
    fig.update_layout(title="Memory", xaxis_title="step", yaxis_title="MiB", **_LAYOUT)
    return fig


def length_histogram(lengths: list[int], max_length: int) -> go.Figure:
    """Token lengths per row, with the max length drawn: bars right of the line get cut."""
    fig = go.Figure(go.Histogram(x=lengths, nbinsx=min(60, max(10, len(set(lengths)))), name="rows",
                                 marker_color="rgb(99,110,250)"))
    fig.add_vline(x=max_length, line_dash="dash", line_color="rgb(239,85,59)",
                  annotation_text=f"max length {max_length}", annotation_position="top left")
    fig.update_layout(title="Tokens per row", xaxis_title="tokens", yaxis_title="rows",
                      **{**_LAYOUT, "legend": dict(visible=False)})
    return fig
