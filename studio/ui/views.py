"""How the core's data reads on the page: run labels and choices, the runs table, the job's
progress line and the data report. The core returns data and plain sentences; this is where
they become markdown and tables (the CLI prints its own plain-text forms)."""

from __future__ import annotations

import time

import pandas as pd

from studio.data import DataReport
from studio.evaluation import stored
from studio.formatting import format_duration
from studio.inference.playground import CHECKPOINT_SEP
from studio.runs import fingerprint
from studio.runs.registry import Run, checkpoint_step
from studio.service import JobView, Studio

ANOTHER_BASE = "trained on another base"  # the base's weights changed since (fingerprint.base_changed)

RUNS_COLUMNS = [
    "run",
    "name",
    "version",
    "state",
    "method",
    "model",
    "steps",
    "final loss",
    "eval loss",
    "task score",
    "duration s",
    "created",
]


def run_label(run: Run) -> str:
    """``name · id vN (method, created, loss x)``: how a trained run is named in a list."""
    s = run.status()
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(s.created_at))
    name = f"{s.name} · " if s.name else ""
    tag = "imported" if s.imported else s.method or "?"
    loss = f", loss {s.final_loss:.3f}" if isinstance(s.final_loss, (int, float)) else ""
    moved = f", {ANOTHER_BASE}" if fingerprint.base_changed(run.fingerprint(), s.model) else ""
    return f"{name}{run.id} v{s.version or 1} ({tag}, {when}{loss}{moved})"


def run_choices(studio: Studio) -> list[tuple[str, str]]:
    """(label, ref) for every finished run (its latest version), then its older kept versions:
    what Export lists."""
    out = []
    for run in studio.trained_runs():
        out.append((run_label(run), run.id))
        out += older_versions(run)
    return out


def older_versions(run: Run) -> list[tuple[str, str]]:
    """(label, ``RUN@vN``) for each kept version before the latest (the run's id means the latest)."""
    out = []
    for v in reversed(run.versions()[:-1]):
        what = f"step {v.record.get('step', '?')}, {v.record.get('kind') or 'trained'}"
        out.append((f"    {run.id} · {v.label} ({what})", f"{run.id}@{v.label}"))
    return out


def chat_choices(studio: Studio) -> list[tuple[str, str]]:
    """(label, ref) for Chat: every trained run, its older versions, then its checkpoints."""
    out = []
    for run, checkpoints in studio.chat_runs():
        out.append((run_label(run), run.id))
        out += older_versions(run)
        out += [
            (f"    {run.id} · checkpoint at step {checkpoint_step(c)}", f"{run.id}{CHECKPOINT_SEP}{c.name}")
            for c in checkpoints
        ]
    return out


def resumable_choices(studio: Studio) -> list[tuple[str, str]]:
    """(label, run id) for runs a Resume can continue, finished ones to a new total."""
    return [
        (
            f"{run.id} (finished at step {step}: continue to N steps)"
            if run.is_continuable()
            else f"{run.id} ({run.status().state}, from step {step} of {run.status().total_steps or '?'})",
            run.id,
        )
        for run, step in studio.resumable_runs()
    ]


def runs_frame(studio: Studio) -> pd.DataFrame:
    """The past-runs table, newest first; "task score" is the latest evaluation's primary metric."""
    rows = []
    for r in studio.runs():
        latest = stored.evaluations(r)
        row = {**r.summary(), "task score": stored.headline(latest[0]) if latest else ""}
        if row["state"] == "finished" and fingerprint.base_changed(r.fingerprint(), row["model"]):
            row["state"] = f"finished, {ANOTHER_BASE}"
        rows.append(row)
    return pd.DataFrame(rows, columns=RUNS_COLUMNS)


def progress_markdown(view: JobView) -> str:
    """The job's state, progress, speed and ETA, then its message, memory check and queue."""
    if view.run_id is None:
        return view.message
    parts = [f"**{view.state.capitalize()}** · run `{view.run_id}`"]
    if view.total_steps:
        parts.append(f"step {view.step} / {view.total_steps} ({100 * view.step / view.total_steps:.0f}%)")
    if view.tokens_per_s:
        parts.append(f"{view.tokens_per_s:,.0f} tokens/s")
    if view.eta_s is not None and view.active:
        parts.append(f"ETA {format_duration(view.eta_s)}")
    text = " · ".join(parts) + f"  \n{view.message}"
    rewards = _rewards_line(view)
    if rewards:
        text += f"  \n{rewards}"
    if view.memory_check:
        text += f"  \n{view.memory_check}"
    if view.queued:
        text += "  \nWaiting to start: " + ", ".join(f"{i}. `{r}`" for i, r in enumerate(view.queued, 1))
    return text


def _rewards_line(view: JobView) -> str:
    """A preference run's latest statistics: how often the chosen answer wins, by how much, and the
    implicit rewards' means (the last 10 steps, and the latest held-out evaluation)."""
    recent = [m.extra for m in view.train[-10:] if "reward_accuracy" in m.extra]
    if not recent:
        return ""

    def mean(key: str) -> float:
        return sum(r[key] for r in recent) / len(recent)

    line = (
        f"Reward accuracy {mean('reward_accuracy'):.0%} (last {len(recent)} steps) · margin "
        f"{mean('reward_margin'):+.3f} · chosen {mean('chosen_reward'):+.3f}, rejected {mean('rejected_reward'):+.3f}"
    )
    held = [m.extra for m in view.evals if "reward_accuracy" in m.extra]
    if held:
        line += f" · held-out accuracy {held[-1]['reward_accuracy']:.0%}"
    return line


def report_markdown(report: DataReport) -> str:
    """The validation report for the Data tab: format, size, tokens, then every finding with its fix."""
    lines = [
        f"**Format:** {report.mapping.describe()}  ",
        f"**File:** {report.table.describe()} · **Rows:** {report.rows} ({report.usable_rows} usable)",
    ]
    if report.stats is not None and len(report.stats.lengths):
        s = report.stats.to_dict()
        lines[-1] += "  "
        lines.append(
            f"**Tokens per epoch:** {s['tokens_per_epoch']:,} · median row {s['length_median']:.0f}, "
            f"longest {s['length_max']} tokens (max length {s['max_length']})"
        )
    if not report.findings:
        lines.append("\nNo problems found. Ready to train.")
    for f in report.findings:
        where = ""
        if f.rows:
            more = f" and {f.count - len(f.rows)} more" if f.count > len(f.rows) else ""
            where = f" Rows {', '.join(map(str, f.rows))}{more}."
        lines.append(
            f"\n- **{'Error' if f.severity == 'error' else 'Warning'}** ({f.code}): {f.message}{where} *Fix:* {f.fix}"
        )
    return "\n".join(lines)
