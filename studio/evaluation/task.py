"""Did the fine-tune help at the task? Base and adapter answer the same rows; metrics score them.

Rows are the run's held-out rows (rebuilt from its config as heldout.py does: same file, mapping,
seed and split) or an eval file the person names, mapped by their mapping, else the run's own
when it set one, else detected. A chat row is scored on its **last assistant turn given every turn before
it**: the prompt is those turns rendered with the run's chat template and its generation prompt,
the reference is that last reply's text (so a multi-turn row is one question, not one answer
glued from every reply). A **plain text row** has no question, so it is scored on continuing
its own text: the prompt is its first half (whole words, no template, as the run trained on
text), the reference its second half; a row of fewer than two words is skipped, and the result
says how many were.

Answers are generated greedily (by default) through the serving engine (studio/serving/engine.py),
a few rows per batch, base and adapter rows side by side in one forward on the one loaded base
(the base rows with every adapter off), with the run's stop tokens and precision. A full
fine-tune is a whole model: its answers come from it loaded on its own, the base's from the
base, each batched by an engine of its own. Batches go to the engine a few rows at a time, so
the Chat tab and API clients take their turn on the model between them.

Scores: each metric's per-row scores for both sides, paired bootstrap intervals and a verdict
(studio/evaluation/stats.py); the first metric is the primary one. The result is stored under
the run folder (``evaluations/<time>-<eval set sha[:12]>.json`` plus its ``.examples.jsonl``),
never over an earlier one.

Example:
    >>> result = evaluate_task(playground, run, rows=50)
    >>> result["metrics"][0]["adapter"], result["verdicts"][0]
"""

from __future__ import annotations

import hashlib
import json
import queue
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from studio.data import DataError, load_and_map, validate
from studio.data.dataset import inspect
from studio.data.render import Conversation
from studio.data.split import split_by_prompt
from studio.data.validate import prompt_key
from studio.evaluation.judge import JudgeSettings, judge_evaluation
from studio.evaluation.metrics import Metric, metric_by_name
from studio.evaluation.regression import measure_regression
from studio.evaluation.shapes import label_report, pick_metrics
from studio.evaluation.stats import Paired, holm, paired, verdict
from studio.evaluation.stored import EVALUATIONS, EXAMPLES_SUFFIX
from studio.inference.playground import (
    BASE_ADAPTER,
    CHECKPOINT_SEP,
    BaseLoad,
    Playground,
    SamplingSettings,
    base_load_for,
)
from studio.models import load_tokenizer
from studio.planning import precision
from studio.runs.files import atomic_write_text
from studio.runs.registry import Run
from studio.serving.engine import Engine, Request

MAX_ROWS = 200  # the default cap: enough for intervals of about +-0.07 near 0.5
BATCH_ROWS = 4  # rows per engine batch; each row runs twice (base and adapter): 8 sequences
MARGIN = 8  # tokens over the longest reference before an answer counts as cut

Progress = Callable[[int, int, "float | None"], None]  # (rows done, rows, seconds left or None)


class EvaluationStopped(RuntimeError):
    """The person pressed Stop; nothing was stored."""


@dataclass
class Row:
    """One scored row: the turns (or text) before the scored answer, and that answer."""

    prompt: list[dict[str, str]] | str  # chat turns before the last assistant turn, or a text's first half
    reference: str
    prompt_ids: list[int]
    prompt_text: str  # what the model is given, as rendered


# ---- rows ----------------------------------------------------------------------------------
def scored_turn(conv: Conversation) -> tuple[list[dict[str, str]] | str, str] | None:
    """(prompt, reference) for a row: the turns before its last assistant turn and that turn's
    text, or a plain text's first half and second half. None when the row has nothing to score."""
    if isinstance(conv, str):
        words = list(re.finditer(r"\S+", conv))
        if len(words) < 2:
            return None
        at = words[len(words) // 2 - 1].end()  # after the middle word, keeping the text's own spacing
        return conv[:at], conv[at:].strip()
    last = max((i for i, m in enumerate(conv) if m["role"] == "assistant" and m["content"].strip()), default=None)
    if last is None:
        return None
    return conv[:last], conv[last]["content"].strip()


def build_rows(convs: list[Conversation], tokenizer, max_length: int) -> tuple[list[Row], int]:
    """Rows ready to generate from, and how many conversations were skipped (nothing to score,
    or a prompt at or over the run's max length, which training never saw an answer after)."""
    rows, skipped = [], 0
    for conv in convs:
        turn = scored_turn(conv)
        if turn is None:
            skipped += 1
            continue
        prompt, reference = turn
        if isinstance(prompt, str):
            text = prompt
        else:
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids or len(ids) >= max_length:
            skipped += 1
            continue
        rows.append(Row(prompt, reference, ids, text))
    return rows, skipped


def held_out_conversations(run: Run, tokenizer) -> list[Conversation]:
    """The run's held-out rows as conversations, split exactly as its trainer split them
    (studio/data/dataset.py: prepare). Raises ValueError with the reason and the fix."""
    cfg = run.config()
    if run.status().imported or not cfg.data.path:
        raise ValueError(
            "This adapter was imported, so its held-out rows are not here; name an eval file "
            "(--eval-path, or upload one) to score it."
        )
    try:
        report = inspect(cfg.data, tokenizer)
    except DataError as exc:
        raise ValueError(f"The run's data can no longer be read ({exc}); name an eval file instead.") from None
    convs = [c for c in report.convs if c is not None]
    if cfg.data.eval_path:
        train_keys = {prompt_key(c) for c in convs}
        held = file_conversations(cfg.data.eval_path, cfg.data.mapping or report.mapping.to_pairs(), tokenizer, cfg)
        held = [c for c in held if prompt_key(c) not in train_keys]  # leaked rows were left out in training too
    else:
        keys = [prompt_key(c) for c in convs]
        _, eval_idx = split_by_prompt(keys, cfg.data.eval_fraction, cfg.data.eval_rows, cfg.training.seed)
        held = [convs[i] for i in eval_idx]
    if not held:
        raise ValueError(
            "This run held out no rows (eval fraction 0 and no eval file), so there is nothing to "
            "score; name an eval file (--eval-path) or set an eval fraction and train again."
        )
    return held


def file_conversations(path: str, mapping: str | list[str], tokenizer, cfg) -> list[Conversation]:
    """An eval file's usable rows, read like the Data tab reads files. Raises ValueError naming
    the file and what is wrong with it (unreadable, columns that map to nothing, no usable row)."""
    try:
        table, column_map = load_and_map(str(path), mapping, cfg.data.max_file_mb)
        report = validate(table, column_map, tokenizer, cfg.data.max_length)
    except DataError as exc:
        raise ValueError(f"The eval file {path} cannot be used: {exc}") from None
    convs = [c for c in report.convs if c is not None]
    if not convs:
        first = report.errors()[0] if report.errors() else None
        why = f" {first.message} {first.fix}" if first else ""
        raise ValueError(f"The eval file {path} has no usable rows.{why}")
    return convs


def eval_set_sha256(rows: list[Row]) -> str:
    """A fingerprint of the scored rows (prompt turns and reference, in any order), so two
    evaluations on the same rows can be found and compared whatever file they came from."""
    items = sorted(json.dumps([r.prompt, r.reference], sort_keys=True, ensure_ascii=False) for r in rows)
    return hashlib.sha256("\n".join(items).encode("utf-8")).hexdigest()


def _sample(items: list, n: int) -> list:
    """``n`` items spread evenly over ``items`` (all of them when there are no more than ``n``)."""
    if len(items) <= n:
        return items
    return [items[i * len(items) // n] for i in range(n)]


# ---- metrics -------------------------------------------------------------------------------
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


# ---- generation ----------------------------------------------------------------------------
def _base_load(playground: Playground, run: Run) -> BaseLoad:
    cfg = run.config()
    run_precision = precision.of_status(run.status())
    return BaseLoad(cfg.model, *base_load_for(cfg.method, run_precision, playground.device), cfg.trust_remote_code)


def _sides(
    playground: Playground, run: Run, checkpoint: str | None, against: tuple[Run, str | None] | None = None
) -> list[tuple[Engine, str | None]]:
    """(engine, request ref) for the base side (or ``against``: another adapter, a run and its
    checkpoint or None) and the adapter side."""
    if against is not None:
        return _adapter_pair(playground, (run, checkpoint), against)
    cfg = run.config()
    run_precision = precision.of_status(run.status())
    load = _base_load(playground, run)
    weights = Playground.weights_for(run, checkpoint)  # no weights: a sentence now, not a failed batch later
    # Models load here, on the caller's thread: a base that cannot load is a ModelError with its
    # sentence, not a failed batch, and loading does not count in the progress estimate.
    with playground.serving(load):
        pass
    if cfg.method == "full":
        # A whole model, not an adapter: it decodes on a playground of its own; the base on the shared one.
        own = Playground(playground.device)
        full_load = BaseLoad(str(weights), "full", run_precision, cfg.trust_remote_code)
        with own.serving(full_load):
            pass
        base = Engine(playground, lambda ref: (load, lambda pg: BASE_ADAPTER), max_batch=BATCH_ROWS)
        tuned = Engine(own, lambda ref: (full_load, lambda pg: BASE_ADAPTER), max_batch=BATCH_ROWS)
        return [(base, None), (tuned, None)]

    def resolve(ref: str | None):
        if ref is None:
            return load, lambda pg: BASE_ADAPTER
        return load, lambda pg: pg.serve_adapter(run, checkpoint)

    engine = Engine(playground, resolve, max_batch=2 * BATCH_ROWS)
    return [(engine, None), (engine, _ref(run, checkpoint))]


def _adapter_pair(
    playground: Playground, mine: tuple[Run, str | None], other: tuple[Run, str | None]
) -> list[tuple[Engine, str | None]]:
    """Two adapters on one loaded base, one engine: both sides in each batch, as the base and an
    adapter are. Both must be adapters trained the same way on the same base."""
    loads = [_base_load(playground, r) for r, _ in (mine, other)]
    if any(r.config().method == "full" for r, _ in (mine, other)) or loads[0] != loads[1]:
        raise ValueError(
            f"Only adapters trained the same way on the same base can be compared row by row: {mine[0].id} "
            f"is {mine[0].config().method} on {mine[0].config().model}, {other[0].id} is "
            f"{other[0].config().method} on {other[0].config().model}. Compare each with the base instead."
        )
    for r, c in (mine, other):
        Playground.weights_for(r, c)  # no weights: a sentence now
    with playground.serving(loads[0]):
        pass
    refs = {_ref(r, c): (r, c) for r, c in (mine, other)}
    engine = Engine(
        playground,
        lambda ref: (loads[0], lambda pg: pg.serve_adapter(*refs[ref])),
        max_batch=2 * BATCH_ROWS,
    )
    return [(engine, _ref(*other)), (engine, _ref(*mine))]


def _ref(run: Run, checkpoint: str | None) -> str:
    return run.id if checkpoint is None else f"{run.id}{CHECKPOINT_SEP}{checkpoint}"


def _wait(requests: list[Request], stop: threading.Event | None) -> None:
    for r in requests:
        while True:
            try:
                kind, payload = r.events.get(timeout=0.25)
            except queue.Empty:
                if stop is not None and stop.is_set():
                    for other in requests:
                        other.cancelled.set()
                    raise EvaluationStopped("The evaluation was stopped; nothing was stored.") from None
                continue
            if kind == "error":
                for other in requests:
                    other.cancelled.set()
                raise ValueError(payload)
            if kind == "done":
                break


def generate(
    sides: list[tuple[Engine, str | None]],
    rows: list[Row],
    settings: SamplingSettings,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> list[list[Request]]:
    """Both sides' finished requests per row (in ``rows`` order), BATCH_ROWS rows at a time.

    Raises:
        EvaluationStopped: ``stop`` was set.
        ValueError: a batch failed (the engine's sentence).
    """
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].prompt_ids))  # similar lengths share a batch
    done: dict[int, list[Request]] = {}
    started = time.perf_counter()
    if progress is not None:
        progress(0, len(rows), None)
    for at in range(0, len(order), BATCH_ROWS):
        if stop is not None and stop.is_set():
            raise EvaluationStopped("The evaluation was stopped; nothing was stored.")
        chunk = order[at : at + BATCH_ROWS]
        for i in chunk:
            done[i] = [
                engine.submit(Request(f"eval-{i}-{side}", ref, rows[i].prompt_ids, settings))
                for side, (engine, ref) in enumerate(sides)
            ]
        _wait([r for i in chunk for r in done[i]], stop)
        if progress is not None:
            finished = at + len(chunk)
            per_row = (time.perf_counter() - started) / finished
            progress(finished, len(rows), per_row * (len(rows) - finished))
    return [done[i] for i in range(len(rows))]


# ---- the evaluation --------------------------------------------------------------------------
def evaluate_task(
    playground: Playground,
    run: Run,
    *,
    checkpoint: str | None = None,
    against: tuple[Run, str | None] | None = None,
    eval_path: str | None = None,
    mapping: str | list[str] = "",
    rows: int | None = None,
    metrics: list[str] | None = None,
    pattern: str | None = None,
    schema: str | None = None,
    max_new_tokens: int | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    judge: JudgeSettings | None = None,
    regression_prompts: int | None = None,
) -> dict[str, Any]:
    """Generate base and adapter answers for the rows, score them, store and return the result
    (the documented ``finetune-studio eval --json`` shape, docs/cli.md).

    Args:
        against: compare with this adapter (a run and its checkpoint or None) instead of the
            base, on the same rows; "base" in the result's metrics then means it.
        eval_path: score this file's rows instead of the run's held-out rows.
        mapping: the eval file's ``column=role`` pairs (default: the run's mapping, else detected).
        rows: at most this many rows, spread evenly (default: all, at most MAX_ROWS).
        metrics, pattern, schema: metric names (studio/evaluation/metrics.py) and what they take;
            default: picked from the references' shape.
        max_new_tokens: default: the longest reference in tokens plus MARGIN.
        judge: also ask this LLM judge (studio/evaluation/judge.py); its failure is ``result["judge"]["error"]``.
        regression_prompts: how many bundled general prompts measure how far the adapter moved
            from the base outside the task (studio/evaluation/regression.py; default all 100,
            0 skips it; not measured with ``against``).

    Raises:
        ValueError: a sentence (no rows, an unreadable eval file, a bad metric, pattern or schema).
        LookupError, ModelError: the run's weights or base cannot be found or loaded.
        EvaluationStopped: ``stop`` was set.
    """
    started = time.perf_counter()
    if rows is not None and rows < 1:
        raise ValueError(f"--rows must be at least 1 (got {rows}).")
    if regression_prompts is not None and regression_prompts < 0:
        raise ValueError(f"--regression-prompts must be 0 (skip) or more (got {regression_prompts}).")
    cfg = run.config()
    if playground.tokenizer is not None and playground.base_ref == cfg.model:
        tokenizer = playground.tokenizer
    else:
        tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    mapping = mapping or cfg.data.mapping  # an eval file is mapped as the run's data was, where the person mapped it
    convs = (
        file_conversations(eval_path, mapping, tokenizer, cfg) if eval_path else held_out_conversations(run, tokenizer)
    )
    scored, skipped = build_rows(_sample(convs, rows or MAX_ROWS), tokenizer, cfg.data.max_length)
    if not scored:
        raise ValueError(
            f"None of the {len(convs)} rows has an answer to score within the run's max length "
            f"({cfg.data.max_length} tokens); check the eval file's responses."
        )
    references = [r.reference for r in scored]
    chosen, reason = choose_metrics(references, metrics, pattern, schema)  # before any model loads
    longest = max(len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for ref in references)
    max_new = max_new_tokens or min(longest + MARGIN, 4096)
    settings = SamplingSettings(max_new_tokens=max_new)
    problems = settings.problems()
    if problems:
        raise ValueError(" ".join(problems))

    engines = _sides(playground, run, checkpoint, against)
    try:
        answers = generate(engines, scored, settings, progress, stop)
        regression = None  # on the same engines, before a full fine-tune's own model goes
        if against is None and regression_prompts != 0:
            regression = measure_regression(
                engines, tokenizer, generate, prompts=regression_prompts, progress=progress, stop=stop
            )
    finally:
        for engine, _ in engines:  # no idle decoding thread, and a full fine-tune's own model goes
            engine.close()
            if engine.playground is not playground:
                engine.playground.model = None
    sides = {
        side: ([a[k].text.strip() for a in answers], [a[k].finish_reason == "length" for a in answers])
        for k, side in enumerate(("base", "adapter"))
    }
    scores = {m.name: {side: m.score_rows(sides[side][0], references) for side in sides} for m in chosen}
    compared = [(m, paired(scores[m.name]["base"], scores[m.name]["adapter"])) for m in chosen]
    result = {
        "run": run.id,
        "checkpoint": checkpoint,
        "version": run.version,
        "rows": len(scored),
        "eval_set_sha256": eval_set_sha256(scored),
        "seconds": 0.0,
        "metrics": [_metric_entry(m, p) for m, p in compared],
        "reason": reason,
        "against": _ref(*against) if against else None,
        "verdicts": [verdict(p, m.name, _ref(*against) if against else None) for m, p in compared],
        "cut_share": {side: sum(cut) / len(scored) for side, (_, cut) in sides.items()},
        "regression": regression,  # how far the adapter moved from the base outside the task
        "judge": None,  # the LLM judge's entry when one is asked (studio/evaluation/judge.py)
        "examples": None,
        "source": str(eval_path) if eval_path else "held-out rows",
        "skipped_rows": skipped,
        "max_new_tokens": max_new,
        "settings": {"metrics": [m.name for m in chosen], "pattern": pattern, "schema": schema, "greedy": True},
    }
    if any(m.name == "label" for m in chosen):
        result["labels"] = {side: label_report(texts, references) for side, (texts, _) in sides.items()}
    judged = None
    if judge is not None:  # after the scores, and never raising: a judge that fails leaves them whole
        answers = (sides[side][0] for side in ("base", "adapter"))
        result["judge"], judged = judge_evaluation(judge, [r.prompt for r in scored], references, *answers)
    result["at"] = time.time()
    result["seconds"] = round(time.perf_counter() - started, 2)
    _store(run, result, scored, sides, scores, judged)
    return result


def _metric_entry(metric: Metric, p: Paired) -> dict[str, Any]:
    """One metric's line of the result: both means with intervals, the paired difference."""
    return {
        "name": metric.name,
        "description": metric.description,
        "base": float(p.base),
        "adapter": float(p.adapter),
        "base_ci95": [float(x) for x in p.base_ci95],
        "adapter_ci95": [float(x) for x in p.adapter_ci95],
        "diff": float(p.diff),
        "diff_ci95": [float(x) for x in p.diff_ci95],
        "wins": int(p.wins),
        "ties": int(p.ties),
        "losses": int(p.losses),
        "p_value": float(p.p_value),
        "n": int(p.n),
        "errors": metric.error_note(),  # rows where the metric failed (scored 0), in a sentence
    }


def _store(run: Run, result: dict, rows: list[Row], sides: dict, scores: dict, judged: list | None = None) -> None:
    """Write the examples JSONL and the result next to it under the run; never over an earlier
    evaluation (a second one in the same second gets its own name)."""
    folder = run.path / EVALUATIONS
    folder.mkdir(parents=True, exist_ok=True)
    stem = time.strftime("%Y%m%d-%H%M%S", time.localtime(result["at"])) + "-" + result["eval_set_sha256"][:12]
    for n in range(1, 1000):
        name = stem if n == 1 else f"{stem}-{n}"
        examples = folder / f"{name}{EXAMPLES_SUFFIX}"
        try:
            handle = examples.open("x", encoding="utf-8")  # claims the name: no other evaluation has it
        except FileExistsError:
            continue
        break
    else:
        raise ValueError(f"Could not find a free name for the evaluation under {folder}.")
    result["examples"] = str(examples)
    result["path"] = str(folder / f"{name}.json")
    with handle:
        for i, r in enumerate(rows):
            line = {"prompt": r.prompt_text, "reference": r.reference}
            line.update({side: texts[i] for side, (texts, _) in sides.items()})
            line["scores"] = {metric: {side: s[side][i] for side in s} for metric, s in scores.items()}
            line["cut"] = {side: cut[i] for side, (_, cut) in sides.items()}
            if not isinstance(r.prompt, str):
                line["messages"] = r.prompt
            if judged and judged[i] is not None:
                line["judge"] = judged[i]  # the judge's verdicts and reasons for this row
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    atomic_write_text(Path(result["path"]), json.dumps(result, indent=2))


def worse_than_base(result: dict[str, Any], alpha: float = 0.05) -> str | None:
    """A sentence when the adapter is worse than the base beyond chance: on the primary metric
    (its paired interval lies below 0), or on any metric after Holm's correction over every
    metric's p-value; else None. What ``--fail-if-worse`` exits 1 on."""
    metrics = result["metrics"]
    if not metrics:
        return None
    primary = metrics[0]
    other = result.get("against") or "the base"
    if primary["diff_ci95"][1] < 0:
        return f"The adapter is worse than {other} on {primary['name']} (the primary metric), beyond chance."
    rejected = holm([m["p_value"] for m in metrics], alpha)
    worse = [m["name"] for m, r in zip(metrics, rejected) if r and m["diff"] < 0]
    if worse:
        return f"The adapter is worse than {other} on {', '.join(worse)}, beyond chance after Holm's correction."
    return None
