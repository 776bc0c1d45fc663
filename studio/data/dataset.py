"""From a data config to tokenized train and eval examples: the path the trainer takes.

read -> map columns (the user's mapping or detection) -> validate (errors stop here, with the
report's sentence) -> split by prompt (or a separate eval file, minus leaked prompts) -> tokenize.

What the examples are depends on the data's kind (``PreparedData.kind``): supervised rows
(``sft``) become Examples, preference pairs (``pairs``) PairExamples, judged answers
(``feedback``) FeedbackExamples; all are split by prompt the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from studio.config import DataConfig
from studio.data.detect import DataMapping, mapping_for
from studio.data.load import DataError, Table, read_table
from studio.data.preference import FeedbackExample, tokenize_feedback, tokenize_pairs
from studio.data.render import Example, PairExample, tokenize_rows
from studio.data.split import split_by_prompt
from studio.data.validate import DataReport, Finding, prompt_key, validate


@dataclass
class PreparedData:
    """The trainer's examples. ``kind`` says what they are: ``sft`` (Example), ``pairs``
    (PairExample: chosen and rejected, each labeled on its answer only) or ``feedback``
    (FeedbackExample: an Example and whether its answer is desirable)."""

    train: list[Example] | list[PairExample] | list[FeedbackExample]
    eval: list[Example] | list[PairExample] | list[FeedbackExample]
    report: DataReport
    notes: list[Finding] = field(default_factory=list)  # e.g. eval rows dropped for leakage
    kind: str = "sft"


def load_and_map(path: str, mapping: str = "", max_file_mb: int = 200) -> tuple[Table, DataMapping]:
    table = read_table(path, max_bytes=max_file_mb * 1024 * 1024)
    return table, mapping_for(table.df, mapping)


def inspect(cfg: DataConfig, tokenizer=None) -> DataReport:
    """The validation report for a data config (what the Data tab and `validate` show)."""
    table, mapping = load_and_map(cfg.path, cfg.mapping, cfg.max_file_mb)
    return validate(table, mapping, tokenizer, cfg.max_length)


def _usable(report: DataReport) -> list:
    """The rows a report lets through: conversations, or pairs / judged rows for preference data."""
    rows = report.convs if report.preference is None else report.preference
    return [r for r in rows if r is not None]


def _key(row) -> str:
    """The prompt a row answers, as the split and the leakage check compare it."""
    return prompt_key(row if isinstance(row, (list, str)) else row.prompt)


def _tokenize(kind: str, rows: list, tokenizer, max_length: int) -> list:
    if kind == "pairs":
        return tokenize_pairs(rows, tokenizer, max_length)
    if kind == "feedback":
        return tokenize_feedback(rows, tokenizer, max_length)
    return tokenize_rows(rows, tokenizer, max_length)


def prepare(cfg: DataConfig, tokenizer, seed: int) -> PreparedData:
    """Tokenized train/eval examples. Raises DataError when the report has an error."""
    report = inspect(cfg, tokenizer)
    if not report.ok:
        first = report.errors()[0]
        raise DataError(f"{first.message} {first.fix}")
    kind = report.kind
    rows = _usable(report)
    keys = [_key(r) for r in rows]
    notes: list[Finding] = []
    if cfg.eval_path:
        eval_table, _ = load_and_map(cfg.eval_path, cfg.mapping or report.mapping.to_pairs(), cfg.max_file_mb)
        eval_report = validate(eval_table, report.mapping, tokenizer, cfg.max_length)
        eval_items = eval_report.convs if eval_report.preference is None else eval_report.preference
        train_keys = set(keys)
        leaked = [i + 1 for i, r in enumerate(eval_items) if r is not None and _key(r) in train_keys]
        if leaked:
            notes.append(
                Finding(
                    "warning",
                    "eval_leakage",
                    f"{len(leaked)} eval rows repeat a training prompt; they were left out of "
                    "evaluation so the eval loss stays honest.",
                    "Remove those prompts from one of the two files.",
                    leaked[:5],
                    len(leaked),
                )
            )
        leaked_set = set(leaked)
        eval_rows = [r for i, r in enumerate(eval_items) if r is not None and i + 1 not in leaked_set]
        train_rows = rows
    else:
        train_idx, eval_idx = split_by_prompt(keys, cfg.eval_fraction, cfg.eval_rows, seed)
        train_rows, eval_rows = [rows[i] for i in train_idx], [rows[i] for i in eval_idx]
    train = _tokenize(kind, train_rows, tokenizer, cfg.max_length)
    if not train:
        raise DataError(
            "No row has anything left to train on after tokenizing; check that responses "
            "are not empty and that max length is not too short."
        )
    return PreparedData(train, _tokenize(kind, eval_rows, tokenizer, cfg.max_length), report, notes, kind)
