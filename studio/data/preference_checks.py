"""Checks for preference data: pairs (prompt, chosen, rejected) and judged answers (feedback).

Rows that cannot be used, with why (studio/data/preference.py reads them); duplicates and
reversed verdicts; token lengths per side against max length; enough pairs; labels of both kinds.
The report has the shape supervised data gets (studio/data/report.py), with the pairs or judged
rows in ``preference`` and each side's token statistics in ``side_stats``.
"""

from __future__ import annotations

import numpy as np

from studio.data.detect import PreferenceMapping
from studio.data.load import Table
from studio.data.preference import feedback_rows, pair_rows
from studio.data.report import DataReport, Finding, LengthStats, add_duplicates, add_finding, check_text
from studio.data.tokens import TokenCounter

# Below MIN_PAIRS training only memorises those few answers and split.py holds none out (it needs
# 10 rows); below FEW_PAIRS the held-out reward accuracy rests on a handful of pairs (10 pairs: a
# 95% interval of about +-0.3 around 0.5), too few to tell learning from luck.
MIN_PAIRS = 8
FEW_PAIRS = 50


# Why a preference row is skipped, per kind: (message, fix). ``{answer}`` names the answer columns.
_PREFERENCE_PROBLEMS = {
    "empty_answer": (
        "{n} rows have an empty {answer} answer; they will be skipped.",
        "Fill in the answers or delete the rows.",
    ),
    "empty_prompt": (
        "{n} rows have no prompt: an empty prompt cell, or an answer alone with no prompt to put before it; "
        "they will be skipped.",
        'Fill in the prompts, or write whole conversations (chat turns, or "\\n\\nHuman: ...\\n\\nAssistant: ..." '
        "text) in the answer cells.",
    ),
    "invalid_json": (
        "{n} rows have a list in {answer} whose items are not {{role, content}} (or {{from, value}}) turns; "
        "they will be skipped.",
        'Write chat turns as [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}].',
    ),
    "bad_roles": (
        "{n} rows have chat turns with unknown roles, turns that do not alternate user/assistant, or no "
        "assistant answer at the end; they will be skipped.",
        "Use the roles system, user and assistant, alternate user and assistant, and end with the assistant's answer.",
    ),
    "prompt_mismatch": (
        "{n} rows have chosen and rejected conversations whose turns before the final answer differ, so "
        "they do not answer the same prompt; they will be skipped.",
        "Make both conversations share every turn but the last assistant answer.",
    ),
    "identical": (
        "{n} rows have the same answer as chosen and rejected; there is nothing to prefer, so they will be skipped.",
        "Replace the rejected answer with a worse one, or delete the rows.",
    ),
    "unknown_label": (
        "{n} rows have a label that does not say good or bad (for example {examples}); they will be skipped.",
        "Write each label as true/false, 1/0, yes/no, up/down, good/bad, thumbs up/down or 👍/👎. If this "
        "column is not a verdict on the answer, map the columns yourself ({remap}) to train them as supervised "
        "data, after removing any answers you would not want taught.",
    ),
}


def _turns_key(turns: list[dict[str, str]]) -> str:
    return "\n".join(f"{m['role']}: {' '.join(m['content'].split()).lower()}" for m in turns)


def validate_preference(table: Table, mapping: PreferenceMapping, tokenizer=None, max_length: int = 512) -> DataReport:
    """Check preference pairs or judged rows: unusable rows with why, duplicates and
    contradictions, lengths per side against max_length, enough pairs, labels of both kinds."""
    df = table.df
    pairs = mapping.kind == "pairs"
    items, problems = pair_rows(df, mapping) if pairs else feedback_rows(df, mapping)
    findings: list[Finding] = []
    answer = f"`{mapping.chosen}` or `{mapping.rejected}`" if pairs else f"`{mapping.response or mapping.messages}`"
    for code, (message, fix) in _PREFERENCE_PROBLEMS.items():
        mask = np.array([p == code for p in problems], dtype=bool)
        examples, remap = "", ""
        if code == "unknown_label" and mask.any():
            seen = df[mapping.label_column].astype(str).to_numpy()[mask]
            examples = ", ".join(f'"{v[:20]}"' for v in list(dict.fromkeys(seen))[:3])
            remap = ",".join(f"{c}={r}" for r, c in mapping.roles().items() if r != "label")
        message = message.format(n="{n}", answer=answer, examples=examples)
        add_finding(findings, "warning", code, mask, message, fix.replace("{remap}", remap))

    usable = np.array([it is not None for it in items], dtype=bool)
    add_duplicates(findings, df, mapping.columns(), usable)
    # The same prompt and answers with the verdict reversed: the two rows cancel out.
    if pairs:
        seen = {(_turns_key(p.prompt), p.chosen.strip(), p.rejected.strip()) for p in items if p is not None}
        flipped = [
            p is not None and (_turns_key(p.prompt), p.rejected.strip(), p.chosen.strip()) in seen for p in items
        ]
        message = (
            "{n} rows prefer the opposite answer of another row with the same prompt and answers; they cancel out."
        )
    else:
        verdicts: dict[tuple[str, str], set[bool]] = {}
        for r in items:
            if r is not None:
                verdicts.setdefault((_turns_key(r.prompt), r.completion.strip()), set()).add(r.desirable)
        flipped = [r is not None and len(verdicts[(_turns_key(r.prompt), r.completion.strip())]) > 1 for r in items]
        message = "{n} rows have the same prompt and answer as another row but the opposite label; they cancel out."
    fix = "Keep one verdict for each prompt and answer, or delete both rows."
    add_finding(findings, "warning", "contradicting_rows", np.array(flipped, dtype=bool), message, fix)
    cells = {
        role: df[col].map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))
        for role, col in mapping.roles().items()
    }
    check_text(findings, cells, len(df))

    stats, side_stats = None, {}
    if tokenizer is not None and usable.any():
        stats, side_stats = _check_lengths(findings, items, usable, tokenizer, max_length, pairs)

    items = [it if usable[i] else None for i, it in enumerate(items)]  # less the prompts that fill max length
    kept = [it for it in items if it is not None]
    noun = "pairs" if pairs else "rows"
    if not kept:
        findings.insert(
            0,
            Finding(
                "error",
                "no_usable_rows",
                f"No {'pair' if pairs else 'row'} can be trained on.",
                "Fix the problems listed below, or check the column mapping.",
            ),
        )
    elif len(kept) < MIN_PAIRS:
        findings.append(
            Finding(
                "error",
                "too_few_pairs" if pairs else "too_few_rows",
                f"Only {len(kept)} usable {noun}; preference training needs at least {MIN_PAIRS}: with fewer "
                "it memorises those few answers, and none can be held out to show whether it learned the preference.",
                f"Add {noun}: {FEW_PAIRS} or more, ideally a few hundred.",
            )
        )
    elif len(kept) < FEW_PAIRS:
        findings.append(
            Finding(
                "warning",
                "few_pairs" if pairs else "few_rows",
                f"Only {len(kept)} usable {noun}: enough to run, but the held-out reward accuracy rests on a "
                "handful of them (on 10 pairs a 95% interval is about ±0.3), too few to tell learning from luck.",
                f"Aim for at least {FEW_PAIRS} {noun}, ideally a few hundred.",
            )
        )
    if not pairs and kept and len({r.desirable for r in kept}) == 1:
        which = "good" if kept[0].desirable else "bad"
        findings.append(
            Finding(
                "warning",
                "one_sided_labels",
                f"All {len(kept)} usable rows are marked {which}: KTO learns from the contrast between answers "
                "marked good and bad, so with one kind it has nothing to push away from (or towards).",
                "Add rows with the other label"
                + (", or train the good rows as supervised data (objective sft)." if which == "good" else "."),
            )
        )
    if pairs:
        convs = [p.conversation("chosen") if p is not None else None for p in items]
    else:
        convs = [r.conversation() if r is not None and r.desirable else None for r in items]
    return DataReport(table, mapping, findings, convs, stats, items, side_stats)


def _check_lengths(findings, items, usable, tokenizer, max_length: int, pairs: bool):
    """Token lengths per side against max length: the rows whose answers get cut (and how much on
    which side), the rows whose prompt leaves no room (taken out of ``usable``). Returns the
    statistics of every row a batch would hold and of each side."""
    rows = np.flatnonzero(usable)
    kept = [items[i] for i in rows]
    prompts = [it.prompt for it in kept]
    if pairs:
        answers = {"chosen": [p.chosen for p in kept], "rejected": [p.rejected for p in kept]}
        prompt_len, totals = answer_lengths(prompts, answers, tokenizer)
        sides = {side: np.ones(len(kept), bool) for side in answers}
    else:
        prompt_len, lengths = answer_lengths(prompts, {"answer": [r.completion for r in kept]}, tokenizer)
        good = np.array([r.desirable for r in kept], dtype=bool)
        totals = {"desirable": lengths["answer"], "undesirable": lengths["answer"]}
        sides = {"desirable": good, "undesirable": ~good}
    room = prompt_len < max_length
    long_rows, cuts = np.zeros(len(items), bool), []
    for side, on_side in sides.items():
        cut = np.maximum(totals[side] - max_length, 0) * (room & on_side)
        long_rows[rows[cut > 0]] = True
        if cut.any():
            cuts.append(
                f"{side} answers lose {int(cut.sum()):,} tokens over {int((cut > 0).sum())} rows "
                f"(at most {int(cut.max())} in one)"
            )
    longest = max(int(t.max()) for t in totals.values())
    add_finding(
        findings,
        "warning",
        "too_long",
        long_rows,
        f"{{n}} rows are longer than the max length of {max_length} tokens; the ends of their answers will be "
        f"cut: {'; '.join(cuts)}. A preference between cut answers only judges what is left of them.",
        f"Raise max length (the longest side has {longest} tokens) or shorten those answers.",
    )
    no_room = np.zeros(len(items), bool)
    no_room[rows[~room]] = True
    add_finding(
        findings,
        "warning",
        "prompt_too_long",
        no_room,
        f"{{n}} rows have a prompt of {max_length} tokens or more, leaving no room for the answers; "
        "they will be skipped.",
        "Raise max length or shorten those prompts.",
    )
    usable &= ~no_room
    side_stats = {side: LengthStats(totals[side][on_side & room], max_length) for side, on_side in sides.items()}
    side_stats = {side: stats for side, stats in side_stats.items() if len(stats.lengths)}
    every_row = np.concatenate([stats.lengths for stats in side_stats.values()]) if side_stats else np.zeros(0, int)
    return LengthStats(every_row, max_length), side_stats


def answer_lengths(
    prompts: list[list[dict[str, str]]], answers: dict[str, list[str]], tokenizer
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Token counts as the chat template renders each row: the prompt up to its answer (the
    generation prompt included), and per side the prompt with that answer and its end of turn.

    Counted like validate.token_lengths (whose sums tests compare with real tokenization):
    message contents in one batch, the template's own text once per shape of roles.
    """
    counter = TokenCounter(tokenizer)
    owners = np.repeat(np.arange(len(prompts)), [len(p) for p in prompts]).astype(np.int64)
    counts = counter.count([m["content"] for p in prompts for m in p])
    contents = np.bincount(owners, weights=counts, minlength=len(prompts)).astype(np.int64)
    opening, closing = np.zeros(len(prompts), np.int64), np.zeros(len(prompts), np.int64)
    cache: dict[tuple[str, ...], tuple[int, int]] = {}
    for i, prompt in enumerate(prompts):
        shape = tuple(m["role"] for m in prompt)
        if shape not in cache:
            cache[shape] = _template_tokens(shape, tokenizer)
        opening[i], closing[i] = cache[shape]
    prompt_len = contents + opening
    return prompt_len, {side: prompt_len + counter.count(texts) + closing for side, texts in answers.items()}


def _template_tokens(shape: tuple[str, ...], tokenizer) -> tuple[int, int]:
    """Tokens the template adds to a prompt of these roles up to the answer, and after the answer."""

    def n(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    empty = [{"role": r, "content": ""} for r in shape]
    opening = n(tokenizer.apply_chat_template(empty, tokenize=False, add_generation_prompt=True))
    whole = n(tokenizer.apply_chat_template(empty + [{"role": "assistant", "content": ""}], tokenize=False))
    return opening, whole - opening
