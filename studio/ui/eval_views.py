"""How an evaluation reads on the Evaluate tab: the verdicts and notes, the scores table, the
label report and the checkpoints' table. The core returns numbers and sentences
(studio/evaluation/); this is where they become markdown and frames."""

from __future__ import annotations

import pandas as pd

from studio.formatting import markdown_cell

HELD_OUT = "the run's held-out rows"
BASE = "base"
METRIC_COLUMNS = ["metric", "compared with", "95% interval", "adapter", "adapter 95% interval"]
METRIC_COLUMNS += ["difference", "difference 95% interval", "wins / ties / losses", "p"]


def checkpoints_markdown(summary: dict) -> str:
    """The checkpoints' table: each one's primary score with its interval, against the base, and
    the eval loss training recorded at that step; then the sentence."""
    metric = summary["checkpoints"][0]["metric"]
    lines = [
        f"**Every checkpoint of {summary['run']}** on {summary['rows']} rows, against the base:",
        "",
        f"| checkpoint | step | {metric} | 95% interval | vs base | eval loss |",
        "|---|---|---|---|---|---|",
    ]
    for c in summary["checkpoints"]:
        best = " **(best)**" if c["checkpoint"] == summary["best"] else ""
        loss = f"{c['eval_loss']:.4f}" if c["eval_loss"] is not None else "-"
        lines.append(
            f"| {c['checkpoint']}{best} | {c['step']} | {c['adapter']:.3f} | {c['adapter_ci95'][0]:.3f} to "
            f"{c['adapter_ci95'][1]:.3f} | {c['diff']:+.3f} | {loss} |"
        )
    return "\n".join([*lines, "", summary["sentence"]])


def summary_markdown(result: dict) -> str:
    """What was scored and the verdict in words, then the notes that qualify it."""
    other = result.get("against") or "the base"
    what = result["run"] + (
        f" @ {result['checkpoint']}" if result.get("checkpoint") else f" v{result.get('version') or 1}"
    )
    lines = [
        f"**{what}** against **{other}** on {result['rows']} rows ({result.get('source', HELD_OUT)}), "
        f"scored in {result.get('seconds', 0):.0f} s.",
        "",
        f"**Metrics:** {result.get('reason', '')}",
        "",
    ]
    preference = result.get("preference")
    if isinstance(preference, dict):  # a preference run: what it was trained to change comes first
        lines.append(f"- {preference['verdict']} ({preference['pairs']} held-out pairs, no generation)")
    lines += [f"- {v}" for v in result.get("verdicts", [])]
    notes = [m["errors"] for m in result.get("metrics", []) if m.get("errors")]
    cut = result.get("cut_share") or {}
    if cut.get("base") or cut.get("adapter"):
        notes.append(
            f"Answers cut at {result.get('max_new_tokens')} tokens: {other} {cut.get('base', 0):.0%}, adapter "
            f"{cut.get('adapter', 0):.0%}; a cut answer may score lower than it would have."
        )
    if result.get("skipped_rows"):
        notes.append(
            f"{result['skipped_rows']} rows were left out: nothing to score, or a prompt at the run's max length."
        )
    regression = result.get("regression")
    if isinstance(regression, dict) and regression.get("sentence"):
        lines += ["", f"**Outside your task:** {regression['sentence']}"]
    judge = result.get("judge")
    if isinstance(judge, dict):
        from studio.evaluation.judge import describe

        lines += ["", "**LLM judge:** " + "  \n".join(line for line in describe(judge) if line)]
    if notes:
        lines += ["", *[f"*{n}*" for n in notes]]
    return "\n".join(lines)


def scores_frame(result: dict) -> pd.DataFrame:
    """One line per metric: the other side and the adapter with intervals, the paired difference."""
    other = result.get("against") or BASE

    def ci(pair) -> str:
        return f"{pair[0]:.3f} to {pair[1]:.3f}"

    lines = [
        [
            m["name"],
            f"{other}: {m['base']:.3f}",
            ci(m["base_ci95"]),
            round(m["adapter"], 3),
            ci(m["adapter_ci95"]),
            f"{m['diff']:+.3f}",
            ci(m["diff_ci95"]),
            f"{m['wins']} / {m['ties']} / {m['losses']}",
            round(m.get("p_value", float("nan")), 3),
        ]
        for m in [*_preference_line(result), *result.get("metrics", [])]
    ]
    return pd.DataFrame(lines, columns=METRIC_COLUMNS)


def _preference_line(result: dict) -> list[dict]:
    """A preference run's held-out preference accuracy as a line of the scores table."""
    p = result.get("preference")
    return [{**p, "name": "preference accuracy (held-out pairs)"}] if isinstance(p, dict) else []


def labels_markdown(result: dict) -> str:
    """Per-label precision/recall/F1 for both sides, and the adapter's confusion matrix."""
    labels = result.get("labels")
    if not labels:
        return ""
    other = result.get("against") or BASE
    base, adapter = labels["base"], labels["adapter"]
    lines = [
        f"**Labels:** accuracy {other} {base['accuracy']:.0%}, adapter {adapter['accuracy']:.0%}; macro F1 "
        f"{base['macro_f1']:.2f} / {adapter['macro_f1']:.2f}.",
        "",
        "| label | rows | precision | recall | F1 (adapter) | F1 (" + other + ") |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in adapter["per_label"].items():
        b = base["per_label"].get(name, {})
        lines.append(
            f"| {_md(name)} | {s['support']} | {s['precision']:.2f} | {s['recall']:.2f} | {s['f1']:.2f} | "
            f"{b.get('f1', 0):.2f} |"
        )
    names = adapter["labels"]
    lines += ["", "Adapter's confusion matrix (rows: reference, columns: answer):", ""]
    lines.append("| | " + " | ".join(_md(n) for n in names) + " | other |")
    lines.append("|---" * (len(names) + 2) + "|")
    for name, row in zip(names, adapter["confusion"]):
        lines.append(f"| {_md(name)} | " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def _md(text: str) -> str:
    return markdown_cell(text, limit=60)
