import json

import pandas as pd
import pytest

from studio.data import DataError, build_report, detect_format, load_table, rows_to_messages, tokenize_rows
from studio.data.render import IGNORE_INDEX, tokenize_messages
from studio.models import load_tokenizer


def test_reads_csv_jsonl_json_parquet(tmp_path):
    rows = [{"prompt": "a b", "completion": "c d"}, {"prompt": "e", "completion": "f"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.json").write_text(json.dumps({"data": rows}))
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_text("prompt;completion\na b;c d\ne;f\n")
    for name in ("d.jsonl", "d.json", "d.parquet", "d.csv"):
        df = load_table(tmp_path / name)
        assert list(df.columns) == ["prompt", "completion"], name
        assert df.iloc[0]["completion"] == "c d"


def test_csv_encodings_quoted_newlines_and_index_column(tmp_path):
    p = tmp_path / "win.csv"
    p.write_bytes(',instruction,output\n0,"caf\xe9\nline two",r\xe9sum\xe9\n'.encode("latin-1"))
    df = load_table(p)
    assert list(df.columns) == ["instruction", "output"]
    assert df.iloc[0]["instruction"] == "café\nline two"
    for even in ("r\xe9sum\xe9", "r\xe9sum\xe9s"):  # odd and even byte lengths
        p.write_bytes(f"instruction,output\ncaf\xe9,{even}\n".encode("cp1252"))
        assert load_table(p).iloc[0]["output"] == even
    p.write_text("instruction,output\nx,\u00fcber\n", encoding="utf-16")
    assert load_table(p).iloc[0]["output"] == "über"


@pytest.mark.parametrize("name,content,match", [
    ("empty.csv", "", "is empty"),
    ("data.txt", "hello", "upload a"),
    ("broken.json", "[{\"a\": 1", "not valid JSON"),
    ("header.csv", "instruction,output\n", "has no rows"),
])
def test_unreadable_files_get_sentences(tmp_path, name, content, match):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(DataError, match=match):
        load_table(p)


def test_size_cap(tmp_path):
    p = tmp_path / "big.csv"
    p.write_text("instruction,output\n" + "a,b\n" * 1000)
    with pytest.raises(DataError, match="above the"):
        load_table(p, max_bytes=100)


@pytest.mark.parametrize("columns,fmt", [
    (["instruction", "input", "output"], "instruction"),
    (["Question", "Answer"], "prompt_completion"),
    (["query", "response", "system"], "prompt_completion"),
    (["messages"], "messages"),
    (["conversations"], "messages"),
    (["text"], "text"),
])
def test_detects_formats(columns, fmt):
    assert detect_format(pd.DataFrame(columns=columns)).format == fmt


def test_unknown_columns_are_listed():
    with pytest.raises(DataError, match="columns: name, age"):
        detect_format(pd.DataFrame(columns=["name", "age"]))


def test_labels_cover_only_the_assistant_reply(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    conv = [{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": "four"}]
    ex = tokenize_messages(conv, tok, max_length=512)
    trained = tok.decode([t for t in ex.labels if t != IGNORE_INDEX])
    assert trained == "four<|im_end|>\n"
    assert ex.input_ids[: ex.labels.index(next(t for t in ex.labels if t != IGNORE_INDEX))] == \
        tok(tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True),
            add_special_tokens=False)["input_ids"]


def test_multi_turn_messages_and_truncation(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    df = pd.DataFrame({"messages": [json.dumps([
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "one"},
        {"role": "user", "content": "again"}, {"role": "assistant", "content": "two"}]),
        "not json"]})
    mapping = detect_format(df)
    convs = rows_to_messages(df, mapping)
    assert len(convs) == 1  # the unreadable row is skipped
    ex = tokenize_rows(convs, tok, 512)[0]
    assert tok.decode([t for t in ex.labels if t != IGNORE_INDEX]) == "one<|im_end|>\ntwo<|im_end|>\n"
    short = tokenize_messages(convs[0], tok, max_length=8)
    assert short.truncated and len(short.input_ids) == 8
    assert tokenize_rows(convs, tok, 4) == []  # nothing trainable left after the cut


def test_report_flags_empty_cells_and_no_usable_rows():
    df = pd.DataFrame({"instruction": ["a", "", "c"], "output": ["x", "y", " "]})
    report = build_report(df, detect_format(df))
    assert report.ok and report.usable_rows == 1
    assert report.findings[0].rows == [2, 3]
    assert "2 rows have an empty" in report.to_markdown()
    empty = pd.DataFrame({"prompt": ["", ""], "completion": ["", ""]})
    bad = build_report(empty, detect_format(empty))
    assert not bad.ok and "No row has both" in bad.to_markdown()
