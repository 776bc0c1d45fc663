import json

import numpy as np
import pandas as pd
import pytest

from studio.config import DataConfig
from studio.data import (
    DataError,
    detect_format,
    load_table,
    parse_mapping,
    prepare,
    read_table,
    rows_to_messages,
    tokenize_rows,
    validate,
)
from studio.data.preview import token_segments
from studio.data.render import IGNORE_INDEX, tokenize_messages
from studio.data.split import split_by_prompt
from studio.data.tokens import TokenCounter
from studio.data.validate import prompt_key, token_lengths
from studio.models import load_tokenizer
from studio.ui.views import report_markdown

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def test_reads_csv_jsonl_json_parquet(tmp_path):
    rows = [{"prompt": "a b", "completion": "c d"}, {"prompt": "e", "completion": "f"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
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
    t = read_table(p)
    assert list(t.df.columns) == ["instruction", "output"]
    assert t.df.iloc[0]["instruction"] == "café\nline two"
    assert t.encoding.startswith("Windows-1252")
    for even in ("r\xe9sum\xe9", "r\xe9sum\xe9s"):  # odd and even byte lengths
        p.write_bytes(f"instruction,output\ncaf\xe9,{even}\n".encode("cp1252"))
        assert load_table(p).iloc[0]["output"] == even
    p.write_text("instruction,output\nx,\u00fcber\n", encoding="utf-16")
    t = read_table(p)
    assert t.df.iloc[0]["output"] == "über" and t.encoding == "UTF-16"


def test_one_column_text_with_pipes_is_not_split(tmp_path):
    p = tmp_path / "notes.csv"
    p.write_text("text\nLOG 01 | pump ok; fine\nLOG 02 | valve | closed\n")
    t = read_table(p)
    assert list(t.df.columns) == ["text"] and t.delimiter == ","
    assert detect_format(t.df).format == "text"


@pytest.mark.parametrize(
    "columns,fmt",
    [
        (["instruction", "input", "output"], "instruction"),
        (["Question", "Answer"], "prompt_completion"),
        (["query", "response", "system"], "prompt_completion"),
        (["input", "target"], "prompt_completion"),
        (["messages"], "messages"),
        (["conversations"], "messages"),
        (["text"], "text"),
    ],
)
def test_detects_formats(columns, fmt):
    df = pd.DataFrame([["x"] * len(columns)], columns=columns)
    m = detect_format(df)
    assert m.format == fmt and 0.5 < m.confidence <= 1


def test_confidence_drops_when_columns_are_mostly_empty():
    full = detect_format(pd.DataFrame({"prompt": ["a", "b"], "completion": ["c", "d"]}))
    half = detect_format(pd.DataFrame({"prompt": ["a", ""], "completion": ["c", "d"]}))
    assert half.confidence < full.confidence


def test_user_mapping_overrides_detection_and_is_checked():
    cols = ["q", "a", "sys", "extra"]
    m = parse_mapping("q=prompt, a=response,sys=system", cols)
    assert (m.format, m.prompt, m.response, m.system, m.detected) == ("prompt_completion", "q", "a", "sys", False)
    assert parse_mapping(["q=prompt", "a=response", "extra=input"], cols).format == "instruction"
    assert parse_mapping(m.to_pairs(), cols) == m
    with pytest.raises(DataError, match="no column `nope`.*`banana` is not a role"):
        parse_mapping("nope=prompt,a=banana", cols)
    with pytest.raises(DataError, match="needs prompt and response"):
        parse_mapping("q=prompt", cols)


def test_labels_cover_only_the_assistant_reply(tok):
    conv = [{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": "four"}]
    ex = tokenize_messages(conv, tok, max_length=512)
    assert tok.decode([t for t in ex.labels if t != IGNORE_INDEX]) == "four<|im_end|>\n"
    first = next(i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX)
    prompt = tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True)
    assert ex.input_ids[:first] == tok(prompt, add_special_tokens=False)["input_ids"]


def test_multi_turn_messages_sharegpt_and_truncation(tok):
    df = pd.DataFrame(
        {
            "conversations": [
                json.dumps(
                    [
                        {"from": "human", "value": "hello"},
                        {"from": "gpt", "value": "one"},
                        {"from": "human", "value": "again"},
                        {"from": "gpt", "value": "two"},
                    ]
                ),
                "not json",
            ]
        }
    )
    convs = rows_to_messages(df, detect_format(df))
    assert len(convs) == 1  # the unreadable row is skipped
    ex = tokenize_rows(convs, tok, 512)[0]
    assert tok.decode([t for t in ex.labels if t != IGNORE_INDEX]) == "one<|im_end|>\ntwo<|im_end|>\n"
    short = tokenize_messages(convs[0], tok, max_length=8)
    assert short.truncated and len(short.input_ids) == 8
    assert tokenize_rows(convs, tok, 4) == []  # nothing trainable left after the cut


MULTILINGUAL = [
    "Hello, world! It's 3.14 o'clock.",
    "Ünïcödé: café, naïve — “quotes” 😀",
    "日本語のテキスト と 中文",
    "  leading spaces\n\nand\ttabs  ",
    "x" * 300,
    "12345 67890 1e-5",
    "emoji 🤖🤖 done",
    "",
]


def test_token_counter_is_exact(tok):
    counter = TokenCounter(tok)
    assert counter.fast
    expected = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in MULTILINGUAL]
    assert counter.count(MULTILINGUAL).tolist() == expected
    assert counter.count(["a <|im_end|> b"]).tolist() == [
        len(tok("a <|im_end|> b", add_special_tokens=False)["input_ids"])
    ]


def test_token_counter_is_exact_on_the_default_tokenizer():
    tok = load_tokenizer("default")
    counter = TokenCounter(tok)
    assert counter.fast
    expected = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in MULTILINGUAL]
    assert counter.count(MULTILINGUAL).tolist() == expected


@pytest.mark.parametrize("model", ["tiny", "default"])
def test_validated_lengths_equal_real_tokenization(model, tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir) if model == "tiny" else "default")
    convs = [
        [{"role": "user", "content": "what is one plus two"}, {"role": "assistant", "content": "three, café"}],
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "see you"},
        ],
        "a plain text document about numbers one two three",
    ]
    totals, prompts = token_lengths(convs, tok)
    for conv, total, prompt in zip(convs, totals, prompts):
        ex = tokenize_messages(conv, tok, None)
        assert total == len(ex.input_ids)
        if not isinstance(conv, str):
            assert prompt == next(i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX)


def test_split_keeps_same_prompt_on_one_side():
    keys = [f"q{i % 30}" for i in range(100)]  # every prompt appears 3-4 times
    train, ev = split_by_prompt(keys, eval_fraction=0.1, seed=1)
    assert sorted(train + ev) == list(range(100))
    assert not {keys[i] for i in train} & {keys[i] for i in ev}
    assert 10 <= len(ev) <= 14
    assert split_by_prompt(keys, 0.1, seed=1) == (train, ev)  # seeded
    assert len(split_by_prompt(keys, 0.1, eval_rows=40, seed=1)[1]) >= 40
    assert split_by_prompt(keys[:5], 0.5) == ([0, 1, 2, 3, 4], [])  # too few rows to spare


def test_prepare_with_eval_file_drops_leaked_prompts(tmp_path, tok):
    train = tmp_path / "train.csv"
    train.write_text("prompt,completion\n" + "".join(f"what is {i},answer {i}\n" for i in range(30)))
    ev = tmp_path / "eval.csv"
    ev.write_text("prompt,completion\nwhat is 3,answer 3\nwhat is 99,answer 99\nWHAT  is 7,answer 7\n")
    data = prepare(DataConfig(path=str(train), eval_path=str(ev), max_length=64), tok, seed=0)
    assert len(data.train) == 30 and len(data.eval) == 1
    leak = data.notes[0]
    assert leak.code == "eval_leakage" and leak.rows == [1, 3]


def test_prepare_refuses_data_with_errors(tmp_path, tok):
    p = tmp_path / "empty_answers.csv"
    p.write_text("prompt,completion\na,\nb,\n")
    with pytest.raises(DataError, match="No row can be trained on"):
        prepare(DataConfig(path=str(p)), tok, seed=0)


def test_preview_segments_mark_trained_masked_and_cut(tok):
    conv = [
        {"role": "user", "content": "what is two plus two"},
        {"role": "assistant", "content": "four and more words"},
    ]
    segs = token_segments(conv, tok, max_length=1000)
    rendered = tok.apply_chat_template(conv, tokenize=False)
    assert "".join(s.text for s in segs) == rendered
    assert "".join(s.text for s in segs if s.trained) == "four and more words<|im_end|>\n"
    assert not any(s.cut for s in segs)
    n_prompt = len(
        tok(tok.apply_chat_template(conv[:1], tokenize=False, add_generation_prompt=True), add_special_tokens=False)[
            "input_ids"
        ]
    )
    cut = token_segments(conv, tok, max_length=n_prompt + 1)
    assert "".join(s.text for s in cut) == rendered
    assert any(s.cut and s.trained for s in cut) and any(s.trained and not s.cut for s in cut)


def test_report_stats_and_markdown(tmp_path, tok):
    p = tmp_path / "d.csv"
    p.write_text("instruction,output\n" + "".join(f"q{i},{'word ' * (i + 1)}\n" for i in range(50)))
    report = validate(read_table(p), detect_format(read_table(p).df), tok, max_length=40)
    s = report.stats
    assert report.ok and s.truncated_rows > 0 and 0 < s.cut_share < 1
    assert s.tokens_per_epoch == int(np.minimum(s.lengths, 40).sum())
    codes = [f.code for f in report.findings]
    assert "too_long" in codes and "few_rows" in codes
    d = report.to_dict()
    assert d["stats"]["truncated_rows"] == s.truncated_rows and d["mapping"] == {
        "prompt": "instruction",
        "response": "output",
    }
    assert "Tokens per epoch" in report_markdown(report)
    assert prompt_key([{"role": "user", "content": " A  b "}, {"role": "assistant", "content": "x"}]) == "a b"
