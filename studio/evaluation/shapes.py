"""What a set of references looks like, and the metrics it calls for: JSON objects, a small label
set, numbers, a format the answers share (an inferred regex), or free text. :func:`pick_metrics`
says why in one plain sentence; :func:`label_report` gives label data its per-label precision,
recall, F1 and confusion matrix.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from studio.evaluation.metrics import MAX_LABELS, Metric, as_text, label_key, metric_by_name, parse_json, parse_number

_SHAPE_TOKEN = re.compile(r"\d+|[^\W\d_]+|\s|.", re.DOTALL)
_NUM = object()  # a run of digits, in a line's shape
_REGEX_SPECIAL = set(".^$*+?{}[]\\|()")


def _shape(line: str) -> list[Any]:
    return [_NUM if t.isdigit() else t for t in _SHAPE_TOKEN.findall(line)]


def _escape(text: str) -> str:
    # re.escape escapes spaces too; the pattern is shown to people, so only what must be.
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in text)


def infer_pattern(references: list[str]) -> str | None:
    """A regular expression for the format the references share, or None when they share none.

    The references must have the same number of lines (at most 20), and at least one line must
    start the same way in every reference with a marker (a symbol such as ``:`` or ``|``, or a
    number) in that shared start: "ANSWER: 26\\nWHY: 5 + 21 = 26." gives
    ``^ANSWER: .+\\nWHY: .+$``, "LOG 03/03 | ..." gives ``^LOG \\d+/\\d+ \\| .+$``. Runs of digits
    generalise to ``\\d+``; what follows the shared start is ``.+``. Free text that merely starts
    with the same word ("The ...") has no marker and gets None.
    """
    refs = [r.replace("\r\n", "\n").strip() for r in references]
    refs = [r for r in refs if r]
    if len(refs) < 3:
        return None
    lines = [r.split("\n") for r in refs]
    count = len(lines[0])
    if count > 20 or any(len(ls) != count for ls in lines):
        return None
    parts, marked = [], False
    for position in range(count):
        shapes = [_shape(ls[position]) for ls in lines]
        common: list[Any] = []
        for tokens in zip(*shapes):
            if any(t is not tokens[0] and t != tokens[0] for t in tokens):
                break
            common.append(tokens[0])
        longer = [len(s) > len(common) for s in shapes]
        marked |= any(t is _NUM or (not t.isspace() and not t.isalnum()) for t in common) and any(
            t is _NUM or (isinstance(t, str) and t.isalnum()) for t in common
        )
        tail = "" if not any(longer) else ".+" if all(longer) else ".*"
        parts.append("".join(r"\d+" if t is _NUM else _escape(t) for t in common) + tail)
    if not marked:
        return None
    return "^" + r"\n".join(parts) + "$"


# --- picking from the references' shape ---------------------------------------------------


def pick_metrics(references: list[str]) -> tuple[list[Metric], str]:
    """Metrics for these references, primary first, and why, in one plain sentence.

    All JSON -> json, json_valid, exact_match; all numbers -> numeric, exact_match (plus label
    when they are few and repeated); a small repeated label set -> label, exact_match; a shared
    line structure -> regex (the format), rouge_l, contains; otherwise free text -> rouge_l,
    chrf, exact_match. Empty references are left out of the look.

    Example:
        >>> [m.name for m in pick_metrics(["yes", "no", "no", "yes"])[0]]
        ['label', 'exact_match']
    """
    refs = [r for r in (as_text(r).replace("\r\n", "\n").strip() for r in references) if r]
    if not refs:
        return [metric_by_name("exact_match")], "There are no references to look at, so only exact match is scored."
    parsed = [parse_json(r) for r in refs]
    if all(ok and isinstance(v, (dict, list)) for ok, v in parsed):
        return _pick_json([v for _, v in parsed])
    keys = Counter(label_key(r) for r in refs)
    numbers = all(parse_number(r, whole=True) is not None for r in refs)
    if len(keys) == 1 and not numbers:
        only = refs[0] if len(refs[0]) <= 40 else refs[0][:37] + "..."
        return [metric_by_name("exact_match"), metric_by_name("contains")], (
            f'Every reference is the same text ("{only}"), which is no label set: exact match and contains.'
        )
    labels = _is_label_set(refs, keys)
    if numbers:
        picked = [metric_by_name("numeric"), metric_by_name("exact_match")]
        extra = f", and they take {len(keys)} values, so label accuracy too" if labels else ""
        if labels:
            picked.insert(1, metric_by_name("label"))
        return picked, (
            "Your answers are numbers: the first number in an answer must equal the reference's "
            f"(to 1 part in a million){extra}."
        )
    if labels:
        names = ", ".join(sorted(_label_names(refs).values())[:8]) + (", ..." if len(keys) > 8 else "")
        return [metric_by_name("label"), metric_by_name("exact_match")], (
            f"Your answers come from {len(keys)} labels ({names}), each used several times: "
            "label accuracy, with precision, recall and F1 per label."
        )
    pattern = infer_pattern(refs)
    if pattern is not None:
        return [metric_by_name("regex", pattern=pattern), metric_by_name("rouge_l"), metric_by_name("contains")], (
            f"Your answers share a format, {_readable(pattern)}: the share of answers in that format, "
            "then ROUGE-L and contains for their content."
        )
    return [metric_by_name("rouge_l"), metric_by_name("chrf"), metric_by_name("exact_match")], (
        f"Your answers are free text ({len(keys)} different among {len(refs)}): ROUGE-L and chrF "
        "measure their overlap with the reference, exact match counts identical ones."
    )


def _pick_json(values: list[Any]) -> tuple[list[Metric], str]:
    metrics = [metric_by_name("json"), metric_by_name("json_valid"), metric_by_name("exact_match")]
    if all(isinstance(v, dict) for v in values):
        sets = Counter(tuple(sorted(v)) for v in values)
        common, _ = sets.most_common(1)[0]
        keys = ", ".join(common) if common else "none"
        vary = "" if len(sets) == 1 else f" (in {len(sets)} different key sets; the most common shown)"
        return metrics, (
            f"Your answers are JSON objects with keys {keys}{vary}: valid JSON, same keys, per-field match."
        )
    return metrics, "Your answers are JSON: valid JSON, the same structure, and equal values."


def _is_label_set(refs: list[str], keys: Counter) -> bool:
    short = all(len(r) <= 60 and "\n" not in r and len(r.split()) <= 6 for r in refs)
    return short and 2 <= len(keys) <= MAX_LABELS and len(keys) * 2 <= len(refs)


def _label_names(refs: list[str]) -> dict[str, str]:
    """label key -> the first spelling seen."""
    names: dict[str, str] = {}
    for r in refs:
        names.setdefault(label_key(r), r.strip())
    return names


def _readable(pattern: str) -> str:
    """An inferred pattern as people read it: ``^ANSWER: .+\\nWHY: .+$`` -> "ANSWER: … / WHY: …"."""
    text = pattern.strip("^$").replace(r"\d+", "#").replace(r"\n", " / ").replace(".+", "…").replace(".*", "…")
    text = re.sub(r"\\(.)", r"\1", text)
    return text if len(text) <= 80 else text[:77] + "..."


def label_report(answers: list[str], references: list[str]) -> dict:
    """Accuracy, per-label precision/recall/F1/support and the confusion matrix of label data.

    Labels are the references' distinct values (ignoring case, spacing and surrounding
    punctuation, shown as first spelled), sorted. ``confusion[i][j]`` counts rows whose
    reference is ``labels[i]`` and whose answer is ``labels[j]``; the last column, ``other``,
    counts answers outside the label set. Precision of a label nobody answered is 0.

    Example:
        >>> label_report(["yes", "no", "maybe"], ["yes", "yes", "no"])["confusion"]
        [[0, 0, 1], [1, 1, 0]]
    """
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers for {len(references)} references: give one answer per row.")
    ref_keys = [label_key(as_text(r)) for r in references]
    ans_keys = [label_key(as_text(a)) for a in answers]
    names = _label_names([as_text(r) for r in references])
    order = sorted(names)
    index = {k: i for i, k in enumerate(order)}
    other = len(order)
    confusion = [[0] * (len(order) + 1) for _ in order]
    for ref, ans in zip(ref_keys, ans_keys):
        confusion[index[ref]][index.get(ans, other)] += 1
    per_label = {}
    for i, key in enumerate(order):
        tp = confusion[i][i]
        support = sum(confusion[i])
        answered = sum(row[i] for row in confusion)
        precision = tp / answered if answered else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[names[key]] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    correct = sum(confusion[i][i] for i in range(len(order)))
    return {
        "labels": [names[k] for k in order],
        "accuracy": correct / len(references) if references else 0.0,
        "macro_f1": sum(v["f1"] for v in per_label.values()) / len(per_label) if per_label else 0.0,
        "per_label": per_label,
        "confusion": confusion,
        "other": sum(row[other] for row in confusion),
    }


def choose_metrics(
    references: list[str], names: list[str] | None = None, pattern: str | None = None, schema: str | None = None
) -> tuple[list[Metric], str]:
    """The person's metrics (``names``, with the pattern or schema they take) or those the
    references' shape suggests, with the reason. Raises ValueError with a sentence."""
    if names:
        metrics = [metric_by_name(n, pattern=pattern, schema=schema) for n in dict.fromkeys(names)]
        return metrics, "You chose " + ", ".join(m.name for m in metrics) + "."
    if pattern or schema:
        raise ValueError(
            "A pattern goes with the regex metric and a schema with the json metric: add --metric regex "
            "or --metric json (several --metric flags may be given)."
        )
    return pick_metrics(references)
