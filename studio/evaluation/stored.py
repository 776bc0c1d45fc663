"""Evaluations already stored: a run's list, its rows for the drill-down, and every run/version
scored on the same eval set side by side.

An evaluation is ``<run>/evaluations/<time>-<eval set sha[:12]>.json`` with its rows in the
``.examples.jsonl`` beside it (written by studio/evaluation/task.py). Files are found from the
folder, not from paths stored inside them: a run folder that moved (a copy, an imported zip)
still shows its scores.

Example:
    >>> latest = evaluations(run)[0]
    >>> frame = drill_down(latest, examples(latest), "adapter worse")
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pandas as pd

from studio.evaluation.metrics import label_key
from studio.runs.files import read_json
from studio.runs.registry import Run

EVALUATIONS = "evaluations"  # the folder under a run that holds its stored evaluations
EXAMPLES_SUFFIX = ".examples.jsonl"
TASK_RESULT, TASK_EXAMPLES = "task_evaluation.json", "task_evaluation.examples.jsonl"  # their names in a zip

# What the drill-down can show (the page's filter), besides one choice per label.
ALL_ROWS = "all rows"
ADAPTER_WORSE = "adapter worse"
ADAPTER_BETTER = "adapter better"
SAME_SCORE = "same score"
INVALID_JSON = "adapter: not JSON with the reference's keys"
CUT = "an answer was cut by max tokens"
LABEL_PREFIX = "label = "
FILTERS = [ALL_ROWS, ADAPTER_WORSE, ADAPTER_BETTER, SAME_SCORE, INVALID_JSON, CUT]


def evaluations(run: Run) -> list[dict[str, Any]]:
    """The run's stored evaluations, newest first; an unreadable file is left out, not fatal.
    Each gets ``path`` and ``examples`` pointing at where the files are now."""
    folder = run.path / EVALUATIONS
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob("*.json"):
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("metrics"), list):
            continue
        data["path"] = str(path)
        data["examples"] = str(path.with_name(path.stem + EXAMPLES_SUFFIX))
        found.append(data)
    return sorted(found, key=lambda d: (d.get("at") or 0, d["path"]), reverse=True)


def examples(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The evaluation's rows (prompt, reference, both answers, per-row scores); [] if the file is
    gone. A damaged line is skipped rather than losing the rest."""
    path = Path(result.get("examples") or "")
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def label(result: dict[str, Any]) -> str:
    """How a stored evaluation is named in a list: when, what was scored, on what."""
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(result.get("at") or 0))
    what = result.get("run", "?")
    if result.get("checkpoint"):
        what += f" @ {result['checkpoint']}"
    elif result.get("version"):
        what += f" v{result['version']}"
    against = result.get("against") or "base"
    return f"{when} · {what} vs {against} · {result.get('rows', '?')} rows of {result.get('source', '?')}"


def latest_of_weights(run: Run, number: int | None = None) -> dict[str, Any] | None:
    """The newest evaluation of one version's weights (default: the latest version; not a
    checkpoint's, not against another adapter): what the model card and the zip report."""
    return next(iter(of_version(run, number)), None)


def of_version(run: Run, number: int | None = None) -> list[dict[str, Any]]:
    """A version's own evaluations against the base, newest first: matched by its weights' sha256
    (by number for evaluations stored before they recorded one)."""
    number = run.version if number is None else number
    try:
        sha = (run.get_version(number).record or {}).get("weights_sha256")
    except ValueError:
        return []
    out = []
    for r in evaluations(run):
        if r.get("checkpoint") or r.get("against"):
            continue
        same = r.get("weights_sha256") == sha if sha and r.get("weights_sha256") else r.get("version") == number
        if same:
            out.append(r)
    return out


def portable(result: dict[str, Any]) -> dict[str, Any]:
    """The result without this machine's paths (what a zip carries)."""
    out = {k: v for k, v in result.items() if k not in ("path", "examples")}
    out["examples"] = TASK_EXAMPLES
    if out.get("source") not in (None, "held-out rows"):
        out["source"] = Path(str(out["source"])).name
    return out


def headline(result: dict[str, Any]) -> str:
    """The primary metric in a few words, for the runs table: ``format 0.96 (base 0.00)``."""
    if not result.get("metrics"):
        return ""
    m = result["metrics"][0]
    return f"{m['name']} {m['adapter']:.2f} ({result.get('against') or 'base'} {m['base']:.2f})"


def drill_down(result: dict[str, Any], rows: list[dict[str, Any]], show: str = ALL_ROWS) -> pd.DataFrame:
    """One line per row: prompt, reference, both answers, then each metric's base and adapter
    scores, keeping only the rows ``show`` asks for (FILTERS, or ``label = X``). "Worse" and
    "better" follow the primary metric, the one the verdict is about."""
    names = [m["name"] for m in result.get("metrics", [])]
    primary = names[0] if names else None
    kept = [(i, r) for i, r in enumerate(rows, 1) if _shown(r, primary, show)]
    columns = ["row", "prompt", "reference", "base", "adapter"]
    for n in names:
        columns += [f"{n}: base", f"{n}: adapter"]
    lines = []
    for i, r in kept:
        line = [i, _text(r.get("prompt")), _text(r.get("reference")), _text(r.get("base")), _text(r.get("adapter"))]
        for n in names:
            s = (r.get("scores") or {}).get(n) or {}
            line += [s.get("base"), s.get("adapter")]
        lines.append(line)
    return pd.DataFrame(lines, columns=columns)


def filter_choices(result: dict[str, Any]) -> list[str]:
    """The filters that mean something for this evaluation: JSON only where json_valid ran,
    one per label where the label metric did."""
    names = {m["name"] for m in result.get("metrics", [])}
    choices = [f for f in FILTERS if f != INVALID_JSON or "json_valid" in names]
    labels = (result.get("labels") or {}).get("adapter", {}).get("labels")
    if "label" in names and labels:
        choices += [LABEL_PREFIX + lab for lab in labels]
    return choices


def comparison(runs: list[Run], eval_set_sha256: str) -> pd.DataFrame:
    """Every run/version/checkpoint scored on this eval set, side by side: its latest score on
    each metric there (with the interval) and the base's on the same rows."""
    lines = []
    for run in runs:
        seen = set()
        for result in evaluations(run):
            if result.get("eval_set_sha256") != eval_set_sha256:
                continue
            key = (result.get("version"), result.get("checkpoint"), result.get("against"))
            if key in seen:  # newest first: an older score of the same thing is history, not a row
                continue
            seen.add(key)
            what = result.get("checkpoint") or f"v{result.get('version') or 1}"
            for m in result["metrics"]:
                lines.append(
                    {
                        "run": run.id,
                        "name": run.name,
                        "version": what,
                        "metric": m["name"],
                        "score": round(m["adapter"], 4),
                        "95% interval": _interval(m["adapter_ci95"]),
                        "compared with": result.get("against") or "base",
                        "its score": round(m["base"], 4),
                        "difference": round(m["diff"], 4),
                        "rows": result.get("rows"),
                        "scored": time.strftime("%Y-%m-%d %H:%M", time.localtime(result.get("at") or 0)),
                    }
                )
    columns = ["run", "name", "version", "metric", "score", "95% interval", "compared with", "its score"]
    columns += ["difference", "rows", "scored"]
    return pd.DataFrame(lines, columns=columns)


def to_csv(frame: pd.DataFrame, path: Path) -> Path:
    """The drill-down as CSV (UTF-8, a header line), for a spreadsheet."""
    frame.to_csv(path, index=False, encoding="utf-8")
    return path


def _shown(row: dict[str, Any], primary: str | None, show: str) -> bool:
    if show in (ALL_ROWS, "", None):
        return True
    if show.startswith(LABEL_PREFIX):
        return label_key(_text(row.get("reference"))) == label_key(show[len(LABEL_PREFIX) :])
    if show == CUT:
        return any((row.get("cut") or {}).values())
    scores = row.get("scores") or {}
    if show == INVALID_JSON:
        s = scores.get("json_valid") or {}
        return s.get("adapter") is not None and s["adapter"] < 1
    s = scores.get(primary) or {}
    base, adapter = s.get("base"), s.get("adapter")
    if base is None or adapter is None:
        return False
    return {ADAPTER_WORSE: adapter < base, ADAPTER_BETTER: adapter > base, SAME_SCORE: adapter == base}.get(show, True)


def _interval(ci: list[float]) -> str:
    return f"{ci[0]:.3f} to {ci[1]:.3f}"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ("" if value is None else json.dumps(value, ensure_ascii=False))
