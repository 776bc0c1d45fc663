"""From a data config to tokenized train and eval examples: the path the trainer takes.

read -> map columns (the user's mapping or detection) -> validate (errors stop here, with the
report's sentence) -> split by prompt (or a separate eval file, minus leaked prompts) -> tokenize.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from studio.config import DataConfig
from studio.data.detect import ColumnMapping, mapping_for
from studio.data.load import DataError, Table, read_table
from studio.data.render import Example, tokenize_rows
from studio.data.split import split_by_prompt
from studio.data.validate import DataReport, Finding, prompt_key, validate


@dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example]
    report: DataReport
    notes: list[Finding] = field(default_factory=list)  # e.g. eval rows dropped for leakage


def load_and_map(path: str, mapping: str = "", max_file_mb: int = 200) -> tuple[Table, ColumnMapping]:
    table = read_table(path, max_bytes=max_file_mb * 1024 * 1024)
    return table, mapping_for(table.df, mapping)


def inspect(cfg: DataConfig, tokenizer=None) -> DataReport:
    """The validation report for a data config (what the Data tab and `validate` show)."""
    table, mapping = load_and_map(cfg.path, cfg.mapping, cfg.max_file_mb)
    return validate(table, mapping, tokenizer, cfg.max_length)


def prepare(cfg: DataConfig, tokenizer, seed: int) -> PreparedData:
    """Tokenized train/eval examples. Raises DataError when the report has an error."""
    report = inspect(cfg, tokenizer)
    if not report.ok:
        first = report.errors()[0]
        raise DataError(f"{first.message} {first.fix}")
    convs = [c for c in report.convs if c is not None]
    keys = [prompt_key(c) for c in convs]
    notes: list[Finding] = []
    if cfg.eval_path:
        eval_table, _ = load_and_map(cfg.eval_path, cfg.mapping or report.mapping.to_pairs(), cfg.max_file_mb)
        eval_report = validate(eval_table, report.mapping, tokenizer, cfg.max_length)
        train_keys = set(keys)
        leaked = [i + 1 for i, c in enumerate(eval_report.convs) if c is not None and prompt_key(c) in train_keys]
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
        eval_convs = [c for i, c in enumerate(eval_report.convs) if c is not None and i + 1 not in leaked_set]
        train_convs = convs
    else:
        train_idx, eval_idx = split_by_prompt(keys, cfg.eval_fraction, cfg.eval_rows, seed)
        train_convs, eval_convs = [convs[i] for i in train_idx], [convs[i] for i in eval_idx]
    train = tokenize_rows(train_convs, tokenizer, cfg.max_length)
    if not train:
        raise DataError(
            "No row has anything left to train on after tokenizing; check that responses "
            "are not empty and that max length is not too short."
        )
    return PreparedData(train, tokenize_rows(eval_convs, tokenizer, cfg.max_length), report, notes)
