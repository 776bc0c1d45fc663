"""Did the fine-tune help at the task? Base and adapter answer the same rows; metrics score them.

The rows and what each is scored on: studio/evaluation/rows.py. Answers are generated greedily
through the serving engine (studio/serving/engine.py), a few rows per batch, base and adapter rows
side by side in one forward on the one loaded base (the base rows with every adapter off), with
the run's stop tokens and precision; batches go to the engine a few rows at a time, so the Chat
tab and API clients take their turn on the model between them. A full fine-tune is a whole
model: its answers come from it loaded on its own, each side batched by an engine of its own.

Scores: each metric's per-row scores for both sides, paired bootstrap intervals and a verdict
(studio/evaluation/stats.py); the first metric is the primary one. Then, on the same engines, how
far the adapter moved outside the task (studio/evaluation/regression.py) and, when asked, an LLM
judge (studio/evaluation/judge.py). The result is stored under the run folder
(``evaluations/<time>-<eval set sha[:12]>.json`` plus its ``.examples.jsonl``), never over an
earlier one (studio/evaluation/stored.py reads them back).

Example:
    >>> result = evaluate_task(playground, run, rows=50)
    >>> result["metrics"][0]["adapter"], result["verdicts"][0]
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from studio.evaluation.judge import JudgeSettings, judge_evaluation
from studio.evaluation.metrics import Metric
from studio.evaluation.preference_eval import NoPairs, preference_accuracy
from studio.evaluation.regression import measure_regression
from studio.evaluation.rows import Row, build_rows, eval_set_sha256, file_conversations, held_out_conversations, spread
from studio.evaluation.shapes import choose_metrics, label_report
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
from studio.runs import files, versions
from studio.runs.files import atomic_write_text
from studio.runs.registry import Run
from studio.serving.engine import Engine, Request

MAX_ROWS = 200  # the default cap: enough for intervals of about +-0.07 near 0.5
BATCH_ROWS = 4  # rows per engine batch; each row runs twice (base and adapter): 8 sequences
MARGIN = 8  # tokens over the longest reference before an answer counts as cut

Progress = Callable[[int, int, "float | None"], None]  # (rows done, rows, seconds left or None)


class EvaluationStopped(RuntimeError):
    """The person pressed Stop; nothing was stored."""


# ---- generation ----------------------------------------------------------------------------
def base_load(playground: Playground, run: Run) -> BaseLoad:
    cfg = run.config()
    run_precision = precision.of_status(run.status())
    return BaseLoad(cfg.model, *base_load_for(cfg.method, run_precision, playground.device), cfg.trust_remote_code)


def _sides(
    playground: Playground,
    run: Run,
    checkpoint: str | None,
    against: tuple[Run, str | None] | None = None,
    on_changed_base: bool = False,
) -> list[tuple[Engine, str | None]]:
    """(engine, request ref) for the base side (or ``against``: another adapter, a run and its
    checkpoint or None) and the adapter side."""
    if against is not None:
        return _adapter_pair(playground, (run, checkpoint), against)
    cfg = run.config()
    run_precision = precision.of_status(run.status())
    load = base_load(playground, run)
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
        return load, lambda pg: pg.serve_adapter(run, checkpoint, on_changed_base)

    engine = Engine(playground, resolve, max_batch=2 * BATCH_ROWS)
    return [(engine, None), (engine, ref_of(run, checkpoint))]


def _adapter_pair(
    playground: Playground, mine: tuple[Run, str | None], other: tuple[Run, str | None]
) -> list[tuple[Engine, str | None]]:
    """Two adapters on one loaded base, one engine: both sides in each batch, as the base and an
    adapter are. Both must be adapters trained the same way on the same base."""
    loads = [base_load(playground, r) for r, _ in (mine, other)]
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
    refs = {ref_of(r, c): (r, c) for r, c in (mine, other)}
    engine = Engine(
        playground,
        lambda ref: (loads[0], lambda pg: pg.serve_adapter(*refs[ref])),
        max_batch=2 * BATCH_ROWS,
    )
    return [(engine, ref_of(*other)), (engine, ref_of(*mine))]


def ref_of(run: Run, checkpoint: str | None) -> str:
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
@dataclass
class Prepared:
    """What an evaluation scores and how, settled before any model loads."""

    tokenizer: Any
    rows: list[Row]
    skipped: int  # rows with nothing to score, or a prompt at the max length
    metrics: list[Metric]
    reason: str  # why these metrics
    settings: SamplingSettings
    source: str  # "held-out rows" or the eval file
    pattern: str | None
    schema: str | None


def prepare(
    playground: Playground,
    run: Run,
    *,
    eval_path: str | None = None,
    mapping: str | list[str] = "",
    rows: int | None = None,
    metrics: list[str] | None = None,
    pattern: str | None = None,
    schema: str | None = None,
    max_new_tokens: int | None = None,
) -> Prepared:
    """The rows, metrics and generation settings an evaluation uses; raises ValueError with a
    sentence for a bad count, file, metric, pattern or schema.

    Args:
        eval_path: score this file's rows instead of the run's held-out rows.
        mapping: the eval file's ``column=role`` pairs (default: the run's mapping, else detected).
        rows: at most this many rows, spread evenly (default: all, at most MAX_ROWS).
        metrics, pattern, schema: metric names (studio/evaluation/metrics.py) and what they take;
            default: picked from the references' shape.
        max_new_tokens: default: the longest reference in tokens plus MARGIN.
    """
    if rows is not None and rows < 1:
        raise ValueError(f"--rows must be at least 1 (got {rows}).")
    cfg = run.config()
    if playground.tokenizer is not None and playground.base_ref == cfg.model:
        tokenizer = playground.tokenizer
    else:
        tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    mapping = mapping or cfg.data.mapping  # an eval file is mapped as the run's data was, where the person mapped it
    convs = (
        file_conversations(eval_path, mapping, tokenizer, cfg) if eval_path else held_out_conversations(run, tokenizer)
    )
    scored, skipped = build_rows(spread(convs, rows or MAX_ROWS), tokenizer, cfg.data.max_length)
    if not scored:
        raise ValueError(
            f"None of the {len(convs)} rows has an answer to score within the run's max length "
            f"({cfg.data.max_length} tokens); check the eval file's responses."
        )
    references = [r.reference for r in scored]
    chosen, reason = choose_metrics(references, metrics, pattern, schema)
    longest = max(len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for ref in references)
    settings = SamplingSettings(max_new_tokens=max_new_tokens or min(longest + MARGIN, 4096))
    problems = settings.problems()
    if problems:
        raise ValueError(" ".join(problems))
    source = str(eval_path) if eval_path else "held-out rows"
    return Prepared(tokenizer, scored, skipped, chosen, reason, settings, source, pattern, schema)


def evaluate_task(
    playground: Playground,
    run: Run,
    *,
    checkpoint: str | None = None,
    against: tuple[Run, str | None] | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    judge: JudgeSettings | None = None,
    regression_prompts: int | None = None,
    on_changed_base: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Generate base and adapter answers for the rows, score them, store and return the result
    (the documented ``finetune-studio eval --json`` shape, docs/cli.md).

    Args:
        against: compare with this adapter (a run and its checkpoint or None) instead of the
            base, on the same rows; "base" in the result's metrics then means it.
        judge: also ask this LLM judge (studio/evaluation/judge.py); its failure is ``result["judge"]["error"]``.
        regression_prompts: how many bundled general prompts measure how far the adapter moved
            from the base outside the task (studio/evaluation/regression.py; default 30 of 100,
            0 skips it; not measured with ``against``).
        on_changed_base: score an adapter whose base's weights changed since it trained (chat
            and serving refuse it): how it does on the base there is now. The result says so.
        options: which rows and metrics, as :func:`prepare` takes them (eval_path, mapping,
            rows, metrics, pattern, schema, max_new_tokens).

    Raises:
        ValueError: a sentence (no rows, an unreadable eval file, a bad metric, pattern or schema).
        LookupError, ModelError: the run's weights or base cannot be found or loaded.
        EvaluationStopped: ``stop`` was set.
    """
    started = time.perf_counter()
    if regression_prompts is not None and regression_prompts < 0:
        raise ValueError(f"--regression-prompts must be 0 (skip) or more (got {regression_prompts}).")
    prep = prepare(playground, run, **options)  # before any model loads
    if on_changed_base and against is not None:
        raise ValueError("A re-evaluation on a changed base compares the adapter with that base, not another adapter.")
    engines = _sides(playground, run, checkpoint, against, on_changed_base)
    try:
        answers = generate(engines, prep.rows, prep.settings, progress, stop)
        regression = None  # on the same engines, before a full fine-tune's own model goes
        if against is None and regression_prompts != 0:
            regression = measure_regression(
                engines, prep.tokenizer, generate, prompts=regression_prompts, progress=progress, stop=stop
            )
        preference = None
        cfg = run.config()
        if (
            cfg.training.objective != "sft"
            and cfg.method != "full"
            and against is None
            and not options.get("eval_path")
        ):
            # What a preference run was trained to change: does it prefer the chosen answers it held out?
            load = base_load(playground, run)
            try:
                preference = preference_accuracy(playground, run, load, checkpoint, stop=stop, accept=on_changed_base)
            except NoPairs:  # kto on feedback rows, or no pairs held out: the generation metrics stand alone
                preference = False
            if preference is None:
                raise EvaluationStopped("The evaluation was stopped; nothing was stored.")
            preference = preference or None
    finally:
        close_sides(engines, playground)
        if on_changed_base:  # loaded unchecked for this evaluation only: chat and serving check it again
            playground.unload(run.id)
    sides = {"base": side_texts(answers, 0), "adapter": side_texts(answers, 1)}
    result, scores = score_sides(run, checkpoint, ref_of(*against) if against else None, prep, sides)
    result["preference"] = preference
    if on_changed_base:
        result["base_weights"] = playground.base_fingerprint.get("weights")  # the base it was scored on
        result["on_changed_base"] = True
    result["regression"] = regression  # how far the adapter moved from the base outside the task
    judged = None
    if judge is not None:  # after the scores, and never raising: a judge that fails leaves them whole
        texts = (sides[side][0] for side in ("base", "adapter"))
        references = [r.reference for r in prep.rows]
        result["judge"], judged = judge_evaluation(judge, [r.prompt for r in prep.rows], references, *texts, stop=stop)
    result["seconds"] = round(time.perf_counter() - started, 2)
    store(run, result, prep.rows, sides, scores, judged)
    return result


def side_texts(answers: list[list[Request]], side: int) -> tuple[list[str], list[bool]]:
    """One side's answer texts and whether each was cut by the token cap."""
    return [a[side].text.strip() for a in answers], [a[side].finish_reason == "length" for a in answers]


def close_sides(sides: list[tuple[Engine, str | None]], playground: Playground) -> None:
    """No idle decoding thread, and a full fine-tune's own model goes."""
    for engine, _ in sides:
        engine.close()
        if engine.playground is not playground:
            engine.playground.model = None


def score_sides(
    run: Run, checkpoint: str | None, against: str | None, prep: Prepared, sides: dict[str, tuple[list, list]]
) -> tuple[dict[str, Any], dict]:
    """The result (the ``--json`` shape) for two sides' answers, and each metric's per-row scores."""
    references = [r.reference for r in prep.rows]
    scores = {m.name: {side: m.score_rows(sides[side][0], references) for side in sides} for m in prep.metrics}
    compared = [(m, paired(scores[m.name]["base"], scores[m.name]["adapter"])) for m in prep.metrics]
    number = versions.number_of(checkpoint) if checkpoint else run.version  # a checkpoint has none
    result = {
        "run": run.id,
        "checkpoint": None if number is not None else checkpoint,  # step-N only: a version is "version"
        "version": number,
        "weights_sha256": files.weights_sha256(run.weights_at(checkpoint)),
        "rows": len(prep.rows),
        "eval_set_sha256": eval_set_sha256(prep.rows),
        "seconds": 0.0,
        "metrics": [_metric_entry(m, p) for m, p in compared],
        "reason": prep.reason,
        "against": against,
        "verdicts": [verdict(p, m.name, against) for m, p in compared],
        "cut_share": {side: sum(cut) / len(prep.rows) for side, (_, cut) in sides.items()},
        "regression": None,
        "judge": None,  # the LLM judge's entry when one is asked (studio/evaluation/judge.py)
        "examples": None,
        "source": prep.source,
        "skipped_rows": prep.skipped,
        "max_new_tokens": prep.settings.max_new_tokens,
        "settings": {
            "metrics": [m.name for m in prep.metrics],
            # The pattern and schema the metrics used (one inferred from the references included):
            # what a re-evaluation passes back to rebuild the same metrics.
            "pattern": next((m.pattern for m in prep.metrics if m.pattern), prep.pattern),
            "schema": next((m.schema for m in prep.metrics if m.schema), prep.schema),
            "greedy": True,
        },
        "at": time.time(),
    }
    if any(m.name == "label" for m in prep.metrics):
        result["labels"] = {side: label_report(texts, references) for side, (texts, _) in sides.items()}
    return result, scores


def _metric_entry(metric: Metric, p: Paired) -> dict[str, Any]:
    """One metric's line of the result: both means with intervals, the paired difference."""
    return {
        "name": metric.name,
        "description": metric.description,
        **p.to_dict(),
        "errors": metric.error_note(),  # rows where the metric failed (scored 0), in a sentence
    }


def store(run: Run, result: dict, rows: list[Row], sides: dict, scores: dict, judged: list | None = None) -> None:
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
    if result.get("version") and not result.get("against") and not result.get("checkpoint"):
        try:
            versions.add_scores(run.get_version(result["version"]), brief(result))
        except ValueError:  # the version was deleted while it was scored: the run keeps the result
            pass


def brief(result: dict[str, Any]) -> dict[str, Any]:
    """An evaluation in a few numbers, kept with the version it scored (its lineage shows it)."""
    return {
        "at": result["at"],
        "eval_set_sha256": result["eval_set_sha256"],
        "source": Path(str(result.get("source"))).name if result.get("source") else None,
        "rows": result["rows"],
        "metrics": [
            {k: m[k] for k in ("name", "base", "adapter", "diff", "diff_ci95", "p_value")} for m in result["metrics"]
        ],
        "verdicts": result.get("verdicts"),
        "regression": (result.get("regression") or {}).get("sentence"),
        "preference": {k: (result.get("preference") or {}).get(k) for k in ("base", "adapter", "diff_ci95", "pairs")}
        if result.get("preference")
        else None,
        "evaluation": Path(result["path"]).name,
        "on_changed_base": bool(result.get("on_changed_base")),
    }


def stored_options(result: dict[str, Any] | None) -> dict[str, Any]:
    """The options of :func:`evaluate_task` that reproduce a stored evaluation's rows, metrics
    and settings (a re-evaluation on a changed base); {} (the defaults) for None. Raises
    ValueError when its eval file is gone."""
    if not result:
        return {}
    settings = result.get("settings") or {}
    options: dict[str, Any] = {
        "rows": result.get("rows"),
        "metrics": settings.get("metrics"),
        "pattern": settings.get("pattern"),
        "schema": settings.get("schema"),
        "max_new_tokens": result.get("max_new_tokens"),
        "regression_prompts": (result.get("regression") or {}).get("prompts", 0),
    }
    source = result.get("source")
    if source and source != "held-out rows":
        if not Path(source).is_file():
            raise ValueError(
                f"The last evaluation scored the file {source}, which is gone; evaluate it with --eval-path again."
            )
        options["eval_path"] = source
    return {k: v for k, v in options.items() if v is not None}


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
