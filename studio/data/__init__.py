"""Dataset intake: load a file, map its columns, validate, render rows to tokens.

table = read_table(path)                          # Table(df, kind, encoding, delimiter)
mapping = mapping_for(table.df, "q=prompt,a=response")  # a person's mapping, else detect_format
mapping.kind                                      # "sft", or "pairs" / "feedback" (PreferenceMapping)
report = validate(table, mapping, tokenizer, max_length)   # findings + token stats
data = prepare(config.data, tokenizer, seed)      # what the trainer uses; data.kind as mapping.kind
"""

from studio.data.dataset import PreparedData, inspect, load_and_map, prepare
from studio.data.detect import (
    ColumnMapping,
    DataMapping,
    PreferenceMapping,
    accepted_names,
    detect_format,
    mapping_for,
    parse_mapping,
)
from studio.data.load import DataError, Table, load_table, read_table
from studio.data.preference import (
    FeedbackExample,
    FeedbackRow,
    PreferencePair,
    label_value,
    tokenize_feedback,
    tokenize_pairs,
)
from studio.data.render import (
    Example,
    PairExample,
    conversations,
    rows_to_messages,
    tokenize_messages,
    tokenize_rows,
)
from studio.data.validate import DataReport, Finding, validate

__all__ = [
    "ColumnMapping",
    "DataError",
    "DataMapping",
    "DataReport",
    "Example",
    "FeedbackExample",
    "FeedbackRow",
    "Finding",
    "PairExample",
    "PreferenceMapping",
    "PreferencePair",
    "PreparedData",
    "Table",
    "accepted_names",
    "conversations",
    "detect_format",
    "inspect",
    "label_value",
    "load_and_map",
    "load_table",
    "mapping_for",
    "parse_mapping",
    "prepare",
    "read_table",
    "rows_to_messages",
    "tokenize_feedback",
    "tokenize_messages",
    "tokenize_pairs",
    "tokenize_rows",
    "validate",
]
