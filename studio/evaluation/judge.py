"""An optional LLM judge: a bigger model, behind any OpenAI-compatible endpoint, says which
answer is better (pairwise) and whether each answer agrees with the reference.

- **Pairwise**: every row is asked twice, base as A and adapter as B, then swapped. A row is a
  win only when both orders prefer the adapter, a loss only when both prefer the base, and a
  tie otherwise, so a judge that favours whichever answer comes first (position bias, common
  in LLM judges) cancels out instead of moving the win rate. A row where either order gave no
  parseable verdict is counted as "no verdict" and left out of the win rate (one order alone
  would let the bias back in). Win rate = mean of win 1, tie 0.5, loss 0, with the
  bootstrap-Wilson interval of studio/evaluation/stats.py.
- **Against the reference**: each side's answer alone, CORRECT or INCORRECT, scored 1 or 0;
  both sides' means with intervals, and the paired difference on rows where both got a verdict.

Every reply is stored per row (the reasons). The key (a flag, or ``FINETUNE_STUDIO_JUDGE_KEY``)
is sent in the Authorization header and nowhere else: not in the result, the examples, the
logs, an error sentence or the settings' repr (studio/evaluation/judge_client.py asks the
judge). A judge that cannot be used raises :class:`JudgeError` with a sentence naming the
problem and the fix; :func:`judge_evaluation` turns that into ``{"error": sentence}`` so the task
scores are stored all the same.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

from studio.evaluation.judge_client import KEY_ENV, JudgeError, JudgeSettings, Refused, ask_all
from studio.evaluation.stats import bootstrap_ci, paired, verdict

__all__ = [
    "KEY_ENV",
    "JudgeError",
    "JudgeSettings",
    "combine",
    "describe",
    "judge_against_reference",
    "judge_evaluation",
    "judge_pairwise",
    "pairwise_messages",
    "parse_verdict",
    "reference_messages",
]

REPLY_CHARS = 2000  # of each judge reply kept as its reason: enough for a few sentences of reasoning
OUTCOME_SCORE = {"win": 1.0, "tie": 0.5, "loss": 0.0}

SYSTEM = "You are a careful, impartial judge of answers written by AI assistants."
PAIRWISE = """Compare two answers to the same request. The reference answer shows what a good answer \
contains; other wordings can be just as good.

[Request]
{question}

[Reference answer]
{reference}

[Answer A]
{a}

[Answer B]
{b}

Which answer is better: more correct and more helpful, judged against the reference? Do not let \
the order of the answers or their length sway you. Give your reason in one or two sentences, then \
end with a line that is exactly one of:
VERDICT: A
VERDICT: B
VERDICT: TIE"""
REFERENCE = """Grade an answer against the reference answer.

[Request]
{question}

[Reference answer]
{reference}

[Answer]
{answer}

Is the answer correct: does it agree with the reference on everything that matters (the wording \
may differ)? Give your reason in one or two sentences, then end with a line that is exactly one of:
VERDICT: CORRECT
VERDICT: INCORRECT"""

# "VERDICT: A", "**Verdict:** [[B]]", "verdict - answer a", "VERDICT: TIE."; the last one counts.
_VERDICT = re.compile(r"verdict\W{0,8}(?:answer\s+)?(tie|incorrect|correct|a|b)(?![a-z])", re.IGNORECASE)


# ---- prompts and verdicts ---------------------------------------------------------------------
def question_text(prompt: list[dict[str, str]] | str) -> str:
    """The request as the judge reads it: a text as itself, one user turn as its text, a
    conversation as labelled turns."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0].get("role") == "user":
        return prompt[0]["content"]
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


def pairwise_messages(question: str, reference: str, a: str, b: str) -> list[dict[str, str]]:
    text = PAIRWISE.format(question=question, reference=reference, a=a or "(empty)", b=b or "(empty)")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]


def reference_messages(question: str, reference: str, answer: str) -> list[dict[str, str]]:
    text = REFERENCE.format(question=question, reference=reference, answer=answer or "(empty)")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]


def parse_verdict(reply: str, allowed: tuple[str, ...]) -> str | None:
    """The last verdict line's choice among ``allowed`` (upper case), or None when there is none.

    Example:
        >>> parse_verdict("B is right. **VERDICT:** [[B]]", ("A", "B", "TIE"))
        'B'
    """
    found = [m.group(1).upper() for m in _VERDICT.finditer(reply or "")]
    found = [v for v in found if v in allowed]
    return found[-1] if found else None


def combine(base_first: str | None, adapter_first: str | None) -> str:
    """One row's outcome from its two orders: ``base_first`` is the verdict with A = base,
    ``adapter_first`` with A = adapter. win / loss only when both orders agree, else tie;
    "no verdict" when either order has none."""
    if base_first is None or adapter_first is None:
        return "no verdict"
    first = {"A": "base", "B": "adapter", "TIE": "tie"}[base_first]
    second = {"A": "adapter", "B": "base", "TIE": "tie"}[adapter_first]
    if first == second == "adapter":
        return "win"
    if first == second == "base":
        return "loss"
    return "tie"


def _reason(reply: str | Refused) -> str:
    return str(reply) if isinstance(reply, Refused) else reply.strip()[:REPLY_CHARS]


# ---- the two ways of judging ------------------------------------------------------------------
def judge_pairwise(
    settings: JudgeSettings,
    prompts: list,
    references: list[str],
    base_answers: list[str],
    adapter_answers: list[str],
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Which answer is better per row, asked in both orders; the adapter's win rate with its 95%
    interval, wins/ties/losses, rows without a verdict, and every reply per row. Raises JudgeError
    (also when ``stop`` is set)."""
    questions = [question_text(p) for p in prompts]
    asks = []
    for q, ref, base, tuned in zip(questions, references, base_answers, adapter_answers, strict=True):
        asks += [pairwise_messages(q, ref, base, tuned), pairwise_messages(q, ref, tuned, base)]
    replies = ask_all(settings, asks, stop)
    rows, outcomes = [], []
    for i in range(len(questions)):
        orders = []
        for name, reply in zip(("A=base, B=adapter", "A=adapter, B=base"), replies[2 * i : 2 * i + 2]):
            choice = None if isinstance(reply, Refused) else parse_verdict(reply, ("A", "B", "TIE"))
            orders.append({"order": name, "verdict": choice, "reason": _reason(reply)})
        outcome = combine(orders[0]["verdict"], orders[1]["verdict"])
        outcomes.append(outcome)
        rows.append({"outcome": outcome, "orders": orders})
    scores = [OUTCOME_SCORE[o] for o in outcomes if o in OUTCOME_SCORE]
    count = {o: outcomes.count(o) for o in ("win", "tie", "loss", "no verdict")}
    summary: dict[str, Any] = {
        "win_rate": sum(scores) / len(scores) if scores else None,
        "win_rate_ci95": list(bootstrap_ci(scores)) if scores else None,
        "wins": count["win"],
        "ties": count["tie"],
        "losses": count["loss"],
        "no_verdict": count["no verdict"],
        "rows": len(outcomes),
    }
    summary["verdict"] = _pairwise_verdict(summary)
    return {**summary, "per_row": rows}


def _pairwise_verdict(s: dict[str, Any]) -> str:
    missing = f"; {s['no_verdict']} of {s['rows']} rows got no verdict in both orders" if s["no_verdict"] else ""
    if s["win_rate"] is None:
        return (
            f"The judge gave no usable verdict on any of the {s['rows']} rows (each row's replies are stored): "
            "try a larger judge model, one that follows the VERDICT line format."
        )
    lo, hi = s["win_rate_ci95"]
    numbers = (
        f"win rate {s['win_rate']:.0%}, 95% interval {lo:.0%} to {hi:.0%}; "
        f"{s['wins']} wins, {s['ties']} ties, {s['losses']} losses{missing}"
    )
    if lo > 0.5:
        return f"The judge prefers the adapter's answers ({numbers}): more than chance."
    if hi < 0.5:
        return f"The judge prefers the base's answers ({numbers}): more than chance."
    return f"The judge prefers neither side beyond chance ({numbers})."


def judge_against_reference(
    settings: JudgeSettings,
    prompts: list,
    references: list[str],
    answers: list[str],
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Each answer alone against its reference: CORRECT scores 1, INCORRECT 0, no verdict None;
    the mean over rows with a verdict and its 95% interval, and every reply. Raises JudgeError."""
    asks = [
        reference_messages(question_text(p), ref, answer)
        for p, ref, answer in zip(prompts, references, answers, strict=True)
    ]
    rows = []
    for reply in ask_all(settings, asks, stop):
        choice = None if isinstance(reply, Refused) else parse_verdict(reply, ("CORRECT", "INCORRECT"))
        score = None if choice is None else float(choice == "CORRECT")
        rows.append({"verdict": choice, "score": score, "reason": _reason(reply)})
    scores = [r["score"] for r in rows if r["score"] is not None]
    return {
        "score": sum(scores) / len(scores) if scores else None,
        "ci95": list(bootstrap_ci(scores)) if scores else None,
        "no_verdict": len(rows) - len(scores),
        "per_row": rows,
    }


# ---- an evaluation's judge ---------------------------------------------------------------------
def judge_evaluation(
    settings: JudgeSettings,
    prompts: list,
    references: list[str],
    base_answers: list[str],
    adapter_answers: list[str],
    stop: threading.Event | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any] | None]]:
    """Both kinds of judging on at most ``settings.max_rows`` rows (spread evenly): the result's
    ``judge`` entry, and each row's verdicts and reasons (None for a row not judged) for the
    examples file. ``prompts`` are the task's (studio/evaluation/task.py: Row.prompt): chat turns,
    or a plain text row's first half, which the judge is told to continue. Never raises for the
    judge's sake: a judge that cannot be used gives ``{"error": sentence, ...}`` and no rows, so
    the task scores are stored all the same; so does ``stop`` (the judge's entry says it was stopped)."""
    started = time.perf_counter()
    prompts = [f"Continue this text:\n{p}" if isinstance(p, str) else p for p in prompts]
    n = len(prompts)
    k = min(n, settings.max_rows)
    picked = [i * n // k for i in range(k)]  # spread evenly, as the task's own rows are

    def take(items: list) -> list:
        return [items[i] for i in picked]

    entry: dict[str, Any] = {**settings.to_dict(), "rows": len(picked), "of_rows": n}
    try:
        pair = judge_pairwise(
            settings, take(prompts), take(references), take(base_answers), take(adapter_answers), stop
        )
        sides = {
            side: judge_against_reference(settings, take(prompts), take(references), take(answers), stop)
            for side, answers in (("base", base_answers), ("adapter", adapter_answers))
        }
    except JudgeError as exc:
        entry.update(error=str(exc), seconds=round(time.perf_counter() - started, 2))
        return entry, [None] * n
    entry["pairwise"] = {k: v for k, v in pair.items() if k != "per_row"}
    entry["reference"] = _reference_summary(sides)
    per_row: list[dict[str, Any] | None] = [None] * n
    for k, i in enumerate(picked):
        per_row[i] = {
            "row": i,
            "pairwise": pair["per_row"][k],
            "reference": {side: sides[side]["per_row"][k] for side in sides},
        }
    entry["per_row"] = [r for r in per_row if r is not None]
    entry["seconds"] = round(time.perf_counter() - started, 2)
    return entry, per_row


def _reference_summary(sides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for side, s in sides.items():
        out[side], out[f"{side}_ci95"] = s["score"], s["ci95"]
    out["no_verdict"] = {side: s["no_verdict"] for side, s in sides.items()}
    both = [
        (b["score"], a["score"])
        for b, a in zip(sides["base"]["per_row"], sides["adapter"]["per_row"])
        if b["score"] is not None and a["score"] is not None
    ]
    if not both:
        out.update(
            diff=None, diff_ci95=None, rows=0, verdict="The judge graded no row on both sides against its reference."
        )
        return out
    p = paired([b for b, _ in both], [a for _, a in both])
    out.update(diff=p.diff, diff_ci95=list(p.diff_ci95), rows=p.n, verdict=verdict(p, "the judge's correctness"))
    return out


def describe(judge: dict[str, Any] | None) -> list[str]:
    """The judge's part of the CLI's table, as lines (none when no judge was asked)."""
    if not judge:
        return []
    head = f"Judge {judge['model']} at {judge['url']}"
    if "error" in judge:
        return ["", f"{head}: {judge['error']}"]
    lines = ["", f"{head}, {judge['rows']} rows, {judge['seconds']:.1f} s:", judge["pairwise"]["verdict"]]
    lines.append(judge["reference"]["verdict"])
    return lines
