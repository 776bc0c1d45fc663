"""A corpus of malformed and messy files, each with the verdict and message it must get from
`finetune-studio validate --json`: exit 0 (can train), 1 (an error blocks) or 2 (unreadable)."""

import io
import json

import pandas as pd
import pytest

from studio.cli import main

pytestmark = pytest.mark.unit

GOOD = "".join(f"what is {i} plus 1,answer {i + 1}\n" for i in range(12))


def _parquet() -> bytes:
    buf = io.BytesIO()
    pd.DataFrame(
        {"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]] * 3}
    ).to_parquet(buf)
    return buf.getvalue()


def _chat(*turns) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})


GOOD_CHAT = _chat(("user", "hi"), ("assistant", "hello"))
GOOD_TURNS = json.dumps(json.loads(GOOD_CHAT)["messages"])  # a JSON list inside a CSV cell

# name, content (str or bytes), expected exit code, expected finding code (or None), extra checks
CORPUS = [
    ("empty.csv", "", 2, "unreadable", "is empty"),
    ("header_only.csv", "instruction,output\n", 2, "unreadable", "has no rows"),
    ("spreadsheet.csv", b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + b"\x00" * 50, 2, "unreadable", "binary"),
    ("notes.txt", "hello", 2, "unreadable", "upload a"),
    ("broken.json", '[{"prompt": "a"', 2, "unreadable", "not valid JSON"),
    ("scalar.json", "42", 2, "unreadable", "list of objects"),
    ("two_lists.json", '{"a": [], "b": []}', 2, "unreadable", "exactly one list"),
    ("bad_line.jsonl", '{"prompt": "a", "completion": "b"}\n{oops\n', 2, "unreadable", "line 2"),
    ("array_line.jsonl", "[1, 2]\n", 2, "unreadable", "not an object"),
    ("ragged.csv", "prompt,completion\na,b\nc,d,e,f\n", 2, "unreadable", "could not be read"),
    ("unknown_columns.csv", "name,age\nann,3\n", 1, "unknown_columns", "columns: name, age"),
    ("no_answers.csv", "prompt,completion\na,\nb,\n", 1, "no_usable_rows", "No row can be trained on"),
    ("some_empty.csv", "prompt,completion\n" + GOOD + "q,\n,r\n", 0, "empty_cells", "2 rows have an empty"),
    ("whitespace.csv", "prompt,completion\n" + GOOD + 'q,"   "\n', 0, "whitespace_cells", "only spaces"),
    ("duplicates.csv", "prompt,completion\n" + GOOD + "what is 0 plus 1,answer 1\n", 0, "duplicate_rows", "row 13"),
    (
        "conflicting.csv",
        "prompt,completion\n" + GOOD + "what is 0 plus 1,answer 7\n",
        0,
        "conflicting_answers",
        "different answer",
    ),
    ("too_long.csv", "prompt,completion\n" + GOOD + "q," + "word " * 200 + "\n", 0, "too_long", "will be cut"),
    ("prompt_too_long.csv", "prompt,completion\n" + GOOD + "word " * 200 + ",a\n", 0, "prompt_too_long", "no room"),
    ("all_too_long.csv", "prompt,completion\n" + ("word " * 200 + ",a\n") * 3, 1, "no_usable_rows", "No row"),
    ("few_rows.csv", "prompt,completion\n" + GOOD, 0, "few_rows", "Only 12 usable rows"),
    (
        "bad_json_cells.csv",
        "messages\n" + "\n".join(['"' + GOOD_TURNS.replace('"', '""') + '"'] * 3) + "\nnot json\n",
        0,
        "invalid_json",
        "not a JSON list",
    ),
    (
        "bad_roles.jsonl",
        "\n".join([GOOD_CHAT] * 3 + [_chat(("user", "a"), ("user", "b"))]),
        0,
        "bad_roles",
        "do not alternate",
    ),
    (
        "unknown_role.jsonl",
        "\n".join([GOOD_CHAT, _chat(("robot", "a"), ("assistant", "b"))]),
        0,
        "bad_roles",
        "unknown roles",
    ),
    ("all_bad_roles.jsonl", _chat(("assistant", "a"), ("user", "b")), 1, "no_usable_rows", "No row"),
    (
        "sharegpt.jsonl",
        json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}),
        0,
        "few_rows",
        "Only 1 usable row",
    ),
    ("mojibake.csv", "prompt,completion\n" + GOOD + "CafÃ© menu,itâ€™s fine\n", 0, "mojibake", "garbled"),
    ("long_cell.csv", "prompt,completion\n" + GOOD + "q," + "y" * 25_000 + "\n", 0, "long_cells", "longer than 20,000"),
    ("semicolon.csv", "prompt;completion\n" + GOOD.replace(",", ";"), 0, None, {"delimiter": ";"}),
    ("tabs.tsv", "prompt\tcompletion\n" + GOOD.replace(",", "\t"), 0, None, {"delimiter": "\t"}),
    ("pipes.csv", "prompt|completion\n" + GOOD.replace(",", "|"), 0, None, {"delimiter": "|"}),
    ("utf16.csv", ("prompt,completion\n" + GOOD + "über,naïve\n").encode("utf-16"), 0, None, {"encoding": "UTF-16"}),
    ("bom.csv", b"\xef\xbb\xbf" + ("prompt,completion\n" + GOOD).encode(), 0, None, {"encoding": "UTF-8 with BOM"}),
    (
        "windows.csv",
        ("prompt,completion\n" + GOOD + "café,résumé\n").encode("cp1252"),
        0,
        None,
        {"encoding": "Windows-1252 (not UTF-8)"},
    ),
    (
        "excel_index.csv",
        ",question,answer\n" + "".join(f"{i},{r}" for i, r in enumerate(GOOD.splitlines(True))),
        0,
        None,
        {"mapping": {"prompt": "question", "response": "answer"}},
    ),
    ("quoted_newlines.csv", 'instruction,output\n"line one\nline two","a\nb"\n' + GOOD, 0, None, {"rows": 13}),
    ("chat.parquet", _parquet(), 0, "duplicate_rows", {"format": "messages"}),
    (
        "wrapped.json",
        json.dumps({"train": [{"question": "q", "answer": "a"}]}),
        0,
        "few_rows",
        {"format": "prompt_completion"},
    ),
    (
        "pipes_in_text.csv",
        "text\nLOG 1 | ok; fine\nLOG 2 | valve | shut\n",
        0,
        "few_rows",
        {"format": "text", "delimiter": ","},
    ),
]


@pytest.mark.parametrize("name,content,exit_code,code,check", CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus_verdicts(name, content, exit_code, code, check, tmp_path, tiny_model_dir, capsys):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    rc = main(["validate", str(path), "--model", str(tiny_model_dir), "--max-length", "64", "--json"])
    out = capsys.readouterr().out
    report = json.loads(out)  # always JSON, never a traceback
    assert "Traceback" not in out
    assert rc == exit_code, report["findings"]
    assert report["ok"] is (exit_code == 0)
    codes = {f["code"]: f for f in report["findings"]}
    if code:
        assert code in codes, codes
        finding = codes[code]
        assert finding["fix"] and finding["message"]
        if isinstance(check, str):
            assert check in finding["message"] + " " + " ".join(f"row {r}" for r in finding["rows"])
    if isinstance(check, dict):
        for key, value in check.items():
            assert report[key] == value, (key, report[key])
    for f in report["findings"]:
        assert f["severity"] in ("error", "warning")
        assert all(isinstance(r, int) and r >= 1 for r in f["rows"])


def test_corpus_is_big_enough():
    assert len(CORPUS) >= 30


def test_mapping_flag_and_text_output(tmp_path, tiny_model_dir, capsys):
    p = tmp_path / "odd.csv"
    p.write_text("a,b\n" + GOOD)
    assert main(["validate", str(p), "--model", str(tiny_model_dir), "--json"]) == 1
    capsys.readouterr()
    assert main(["validate", str(p), "--model", str(tiny_model_dir), "--mapping", "a=prompt", "b=response"]) == 0
    out = capsys.readouterr().out
    assert "prompt = a, response = b (your mapping)" not in out  # text output has no markdown
    assert "your mapping" in out and "OK: training can proceed." in out
    assert main(["validate", str(p), "--model", str(tiny_model_dir), "--mapping", "zzz=prompt", "--json"]) == 1
    assert "no column `zzz`" in capsys.readouterr().out
