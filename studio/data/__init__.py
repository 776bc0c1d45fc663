"""Dataset intake: load a file, detect its shape, report problems, render rows to tokens.

    table = load_table(path)            # pandas DataFrame, or DataError with a sentence
    mapping = detect_format(table)      # which columns mean what
    report = build_report(table, mapping)
    examples = tokenize_rows(rows_to_messages(table, mapping), tokenizer, max_length)
"""

from studio.data.detect import ColumnMapping, detect_format
from studio.data.load import DataError, load_table
from studio.data.render import Example, rows_to_messages, tokenize_messages, tokenize_rows
from studio.data.report import DataReport, build_report

__all__ = [
    "ColumnMapping", "DataError", "DataReport", "Example", "build_report", "detect_format",
    "load_table", "rows_to_messages", "tokenize_messages", "tokenize_rows",
]
