"""Held-out preference accuracy: on each held-out pair, does the model give the chosen answer a
higher log-probability than the rejected one? The base (the adapter switched off) and the adapter
on the same pairs, paired, with intervals (studio/evaluation/stats.py).

This is what a preference run (dpo, orpo) was trained to change, measured without generating: the
summed log-probability of each answer's tokens after the same prompt, on the one loaded base with
its adapter on and off (studio/inference/playground.py), in the run's precision. The pairs are the
run's own held-out split (studio/data/dataset.py ``prepare``, same seed), never trained on.

Example:
    >>> result = preference_accuracy(playground, run)
    >>> result["adapter"], result["adapter_ci95"], result["verdict"]
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from studio.data import prepare
from studio.data.render import collate
from studio.evaluation.stats import paired, verdict
from studio.inference.playground import BASE_ADAPTER, BaseLoad, Playground
from studio.models import load_tokenizer
from studio.planning import precision
from studio.runs.registry import Run
from studio.training.preference import sequence_logps

METRIC = "preference_accuracy"


class NoPairs(ValueError):
    """The run has no held-out preference pairs to score (it trained on feedback or supervised
    rows, or held none out): the sentence says which."""


BATCH_PAIRS = 8


def preference_accuracy(
    playground: Playground,
    run: Run,
    load: BaseLoad,
    checkpoint: str | None = None,
    *,
    max_pairs: int | None = None,
    stop: threading.Event | None = None,
    accept: bool = False,
) -> dict[str, Any] | None:
    """Base vs adapter preference accuracy on the run's held-out pairs, the base loaded as
    ``load`` (studio/evaluation/task.py ``base_load``); None when ``stop`` was set. ``accept``: a
    base whose weights changed since the run trained (a re-evaluation on it; the caller unloads).

    Raises:
        NoPairs: the run did not train on preference pairs, or holds out none.
        ValueError: a full fine-tune (no adapter to switch off).
    """
    cfg = run.config()
    if cfg.method == "full":
        raise ValueError(
            "Preference accuracy compares the base with its adapter switched off; a full fine-tune has none."
        )
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    data = prepare(cfg.data, tokenizer, cfg.training.seed)
    if data.kind != "pairs":
        raise NoPairs(f"Run {run.id} did not train on preference pairs, so it has no held-out pairs to score.")
    pairs = data.eval[:max_pairs] if max_pairs else data.eval
    if not pairs:
        raise NoPairs(
            f"Run {run.id} held out no pairs (data.eval_fraction, data.eval_rows): train with some held out to "
            "score it."
        )
    run_precision = precision.of_status(run.status())
    base_wins, adapter_wins = [], []
    with playground.serving(load):
        name = playground.serve_adapter(run, checkpoint, accept)
        device = next(playground.model.parameters()).device
        for start in range(0, len(pairs), BATCH_PAIRS):
            if stop is not None and stop.is_set():
                return None
            rows = [r for pair in pairs[start : start + BATCH_PAIRS] for r in pair.rows()]
            batch = {k: v.to(device) for k, v in collate(rows, tokenizer.pad_token_id).items()}
            for adapter, wins in ((BASE_ADAPTER, base_wins), (name, adapter_wins)):
                with torch.no_grad(), playground.one_adapter(adapter), precision.autocast(device.type, run_precision):
                    logps, _ = sequence_logps(
                        playground.model, batch["input_ids"], batch["attention_mask"], batch["labels"]
                    )
                wins += (logps[0::2] > logps[1::2]).float().tolist()
    p = paired(base_wins, adapter_wins)
    return {
        "metric": METRIC,
        "description": "the chosen answer gets a higher log-probability than the rejected one",
        "pairs": len(pairs),
        **p.to_dict(),
        "verdict": verdict(p, METRIC),
    }
