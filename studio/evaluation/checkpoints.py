"""Which checkpoint is best at the task, not only on loss: every checkpoint of a LoRA/QLoRA run
and its final weights answer the same rows as the base, in one pass (the base answers once; every
adapter rides in the same batches of the one loaded base), each scored and stored as
studio/evaluation/task.py stores an evaluation; then the best on the primary metric, in a sentence
that says whether it beats the final weights by more than chance and whether the lowest eval
loss was somewhere else.

Example:
    >>> evaluate_checkpoints(playground, run, rows=50)["sentence"]
    'step-40 (step 40) scores highest on exact match: 0.640 against 0.580 for the final weights (+6 points, ...'
"""

from __future__ import annotations

import threading
import time
from typing import Any

from studio.evaluation.stats import paired
from studio.evaluation.task import (
    BATCH_ROWS,
    Progress,
    base_load,
    close_sides,
    generate,
    prepare,
    ref_of,
    score_sides,
    side_texts,
    store,
)
from studio.inference.playground import BASE_ADAPTER, Playground
from studio.runs.registry import Run
from studio.serving.engine import Engine


def evaluate_checkpoints(
    playground: Playground,
    run: Run,
    *,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Score every checkpoint of a LoRA/QLoRA run and its final weights against the base on the
    same rows, in one pass (the base answers once; every adapter rides in the same batches), and
    say which scores best on the primary metric, and whether that is larger than chance against
    the final weights. Each one's evaluation is stored as :func:`evaluate_task` stores it.

    ``options`` are :func:`prepare`'s. Raises ValueError (a full fine-tune, no checkpoints, or
    what :func:`prepare` raises), EvaluationStopped."""
    started = time.perf_counter()
    cfg = run.config()
    if cfg.method == "full":
        raise ValueError(
            "Each checkpoint of a full fine-tune is a whole model: score them one at a time "
            f"(finetune-studio eval {run.id}@step-N)."
        )
    names = [c.name for c in run.checkpoints()]
    if not names:
        raise ValueError(f"Run {run.id} kept no checkpoints (training.save_steps); its final weights are all there is.")
    prep = prepare(playground, run, **options)
    load = base_load(playground, run)
    weights = [(name, Playground.weights_for(run, name)) for name in [*names, None]]  # missing: a sentence now
    with playground.serving(load):
        pass
    refs = {ref_of(run, name): name for name, _ in weights}

    def resolve(ref: str | None):
        if ref is None:
            return load, lambda pg: BASE_ADAPTER
        return load, lambda pg: pg.serve_adapter(run, refs[ref])

    engine = Engine(playground, resolve, max_batch=BATCH_ROWS * (len(refs) + 1))
    sides = [(engine, None)] + [(engine, ref) for ref in refs]
    try:
        answers = generate(sides, prep.rows, prep.settings, progress, stop)
    finally:
        close_sides(sides, playground)
    base = side_texts(answers, 0)
    results, per_row = [], []
    for k, name in enumerate(refs.values(), start=1):
        adapter = side_texts(answers, k)
        result, scores = score_sides(run, name, None, prep, {"base": base, "adapter": adapter})
        result["seconds"] = round(time.perf_counter() - started, 2)
        store(run, result, prep.rows, {"base": base, "adapter": adapter}, scores)
        results.append(result)
        per_row.append(scores[prep.metrics[0].name]["adapter"])
    return _best_checkpoint(run, results, per_row)


def _best_checkpoint(run: Run, results: list[dict], per_row: list[list[float]]) -> dict[str, Any]:
    """The checkpoints' table and which scores best on the primary metric, in a sentence."""
    losses = {m.step: m.eval_loss for m in run.eval_metrics()}
    final_step = run.status().step
    lines = []
    for r in results:
        m = r["metrics"][0]
        step = int(r["checkpoint"].removeprefix("step-")) if r["checkpoint"] else final_step
        lines.append(
            {
                "checkpoint": r["checkpoint"] or "final",
                "step": step,
                "metric": m["name"],
                "adapter": m["adapter"],
                "adapter_ci95": m["adapter_ci95"],
                "base": m["base"],
                "diff": m["diff"],
                "diff_ci95": m["diff_ci95"],
                "eval_loss": losses.get(step),
                "path": r["path"],
            }
        )
    best = max(range(len(lines)), key=lambda i: (lines[i]["adapter"], lines[i]["step"]))
    final = len(lines) - 1
    name, metric = lines[best]["checkpoint"], lines[best]["metric"]
    if best == final:
        sentence = f"The final weights score highest on {metric} ({lines[final]['adapter']:.3f})."
    else:
        p = paired(per_row[final], per_row[best])  # the same rows: paired, best minus final
        chance = "larger than chance" if p.diff_ci95[0] > 0 else "not larger than chance on these rows"
        sentence = (
            f"{name} (step {lines[best]['step']}) scores highest on {metric}: {lines[best]['adapter']:.3f} against "
            f"{lines[final]['adapter']:.3f} for the final weights ({_points(p.diff)} points, 95% interval "
            f"{_points(p.diff_ci95[0])} to {_points(p.diff_ci95[1])}: {chance})."
        )
    by_loss = [x for x in lines if x["eval_loss"] is not None]
    if by_loss:
        lowest = min(by_loss, key=lambda x: x["eval_loss"])
        if lowest["checkpoint"] != name:
            sentence += (
                f" The lowest eval loss was at {lowest['checkpoint']} (step {lowest['step']}): "
                "loss and the task score disagree."
            )
    return {
        "run": run.id,
        "rows": results[0]["rows"],
        "eval_set_sha256": results[0]["eval_set_sha256"],
        "checkpoints": lines,
        "best": name,
        "sentence": sentence,
    }


def _points(x: float) -> str:
    return f"{x * 100:+.0f}"
