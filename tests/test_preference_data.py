"""Issue 25, data: preference pairs and thumbs up/down feedback are detected (never as supervised
data), read from every shape (CSV with JSON strings, JSONL and Parquet lists, Anthropic HH text),
checked with row numbers, tokenized with labels on the answers only, and split by prompt."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

from studio.cli import main
from studio.config import DataConfig
from studio.data import (
    DataError,
    FeedbackExample,
    PairExample,
    PreferenceMapping,
    detect_format,
    mapping_for,
    parse_mapping,
    prepare,
    read_table,
    tokenize_pairs,
    validate,
)
from studio.data.preference import feedback_rows, hh_turns, label_value, pair_rows, tokenize_answer
from studio.data.preference_checks import FEW_PAIRS, MIN_PAIRS, answer_lengths
from studio.data.render import IGNORE_INDEX
from studio.data.validate import prompt_key
from studio.models import load_tokenizer
from tests.helpers import write_csv

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "studio" / "templates" / "samples" / "preferences.csv"


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def _turns(*pairs) -> list[dict]:
    return [{"role": r, "content": c} for r, c in pairs]


def _sums(n: int, start: int = 1) -> list[list[str]]:
    """n distinct pairs: the right sum chosen, a wrong one of the same shape rejected."""
    return [[f"what is {i} plus 2", f"answer {i + 2}", f"answer {i + 3}"] for i in range(start, start + n)]


def _codes(report) -> dict:
    return {f.code: f for f in report.findings}


# Detection ------------------------------------------------------------------------------------


def test_csv_pairs_with_text_and_json_string_answers(tmp_path):
    answer_only = json.dumps(_turns(("assistant", "four")))
    whole = json.dumps(_turns(("user", "two plus two?"), ("assistant", "five")))
    p = tmp_path / "pairs.csv"
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "chosen", "rejected"])
        w.writerow(["two plus two?", "four", "five"])  # plain text
        w.writerow(["two plus two?", answer_only, whole])  # the answer alone, and the whole conversation
        w.writerow(["list?", "[1, 2, 3]", '[{"name": "a"}]'])  # JSON that is not chat turns is an answer
    table = read_table(p)
    m = mapping_for(table.df)
    assert isinstance(m, PreferenceMapping) and (m.kind, m.format) == ("pairs", "pairs")
    assert (m.prompt, m.chosen, m.rejected) == ("prompt", "chosen", "rejected") and m.confidence >= 0.9
    pairs, problems = pair_rows(table.df, m)
    assert problems == [None, None, None]
    assert pairs[0].prompt == _turns(("user", "two plus two?")) and (pairs[0].chosen, pairs[0].rejected) == (
        "four",
        "five",
    )
    assert pairs[1] == pairs[0]
    assert (pairs[2].chosen, pairs[2].rejected) == ("[1, 2, 3]", '[{"name": "a"}]')


def test_jsonl_and_parquet_whole_conversations_share_their_prompt(tmp_path):
    history = [("system", "be brief"), ("user", "hi"), ("assistant", "hello"), ("user", "capital of france?")]
    rows = [
        {"chosen": _turns(*history, ("assistant", "Paris")), "rejected": _turns(*history, ("assistant", "Lyon"))},
        {  # the turns before the answers differ: not one prompt
            "chosen": _turns(("user", "a"), ("assistant", "b")),
            "rejected": _turns(("user", "other"), ("assistant", "c")),
        },
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "p.parquet")
    for name in ("p.jsonl", "p.parquet"):
        df = read_table(tmp_path / name).df
        m = detect_format(df)
        assert (m.kind, m.format, m.prompt) == ("pairs", "pair_conversations", None), name
        pairs, problems = pair_rows(df, m)
        assert problems == [None, "prompt_mismatch"], name
        assert pairs[0].prompt == _turns(*history) and (pairs[0].chosen, pairs[0].rejected) == ("Paris", "Lyon")


def test_anthropic_hh_text():
    chosen = "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: what is 2+2?\n\nAssistant: 4"
    rejected = "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: what is 2+2?\n\nAssistant: 5, I think"
    assert hh_turns(chosen)[-2:] == _turns(("user", "what is 2+2?"), ("assistant", "4"))
    assert hh_turns("just an answer") is None
    df = pd.DataFrame({"chosen": [chosen, "plain answer"], "rejected": [rejected, "other answer"]})
    m = detect_format(df)
    assert m.format == "pair_conversations"
    pairs, problems = pair_rows(df, m)
    assert problems == [None, "empty_prompt"]  # plain answers with no prompt column have no prompt
    assert pairs[0].prompt == _turns(("user", "hi there"), ("assistant", "hello!"), ("user", "what is 2+2?")) and (
        pairs[0].chosen,
        pairs[0].rejected,
    ) == ("4", "5, I think")


@pytest.mark.parametrize(
    "columns,fmt",
    [
        (["question", "chosen", "rejected"], "pairs"),
        (["instruction", "input", "chosen", "rejected"], "pairs"),
        (["system", "input", "chosen", "rejected"], "pairs"),  # Orca-DPO style: input is the question
        (["chosen", "rejected"], "pair_conversations"),
        (["prompt", "messages", "chosen", "rejected"], "pairs"),  # UltraFeedback style: messages ignored
        (["messages", "chosen", "rejected"], "pair_conversations"),
        (["prompt", "completion", "label"], "feedback"),
        (["instruction", "output", "label"], "feedback"),
        (["messages", "label"], "feedback"),
    ],
)
def test_preference_shapes_come_before_supervised_ones(columns, fmt):
    m = detect_format(pd.DataFrame([["x"] * len(columns)], columns=columns))
    assert m.format == fmt and m.kind == ("feedback" if fmt == "feedback" else "pairs")
    assert "messages" not in m.roles() or fmt == "feedback"
    if "input" in columns and "instruction" in columns:
        assert (m.prompt, m.input) == ("instruction", "input")
    elif "input" in columns:
        assert (m.prompt, m.system) == ("input", "system")


def test_thumbs_feedback_is_never_supervised_data(tmp_path):
    p = write_csv(
        tmp_path / "thumbs.csv",
        ["prompt", "completion", "label"],
        [["q1", "good answer", "👍"], ["q2", "bad answer", "thumbs down"]],
    )
    table = read_table(p)
    m = mapping_for(table.df)
    assert m.kind == "feedback" and m.label_column == "label" and m.describe().startswith("feedback for KTO")
    report = validate(table, m)
    assert report.kind == "feedback"
    # What a supervised reader would train on holds the good answer only, never the bad one.
    assert [c[-1]["content"] if c else None for c in report.convs] == ["good answer", None]
    rows, problems = feedback_rows(table.df, m)
    assert [r.desirable for r in rows] == [True, False] and problems == [None, None]


@pytest.mark.parametrize(
    "value,verdict",
    [
        (True, True),
        ("TRUE", True),
        (1, True),
        ("1", True),
        ("1.0", True),
        ("yes", True),
        ("Up", True),
        ("👍", True),
        ("👍🏽", True),
        ("Thumbs Up", True),
        ("thumbs_up", True),
        ("good", True),
        (False, False),
        ("false", False),
        (0, False),
        (-1, False),
        ("0", False),
        ("No", False),
        ("down", False),
        ("👎", False),
        ("thumbs-down", False),
        ("maybe", None),
        ("", None),
        (2, None),
        (float("nan"), None),
    ],
)
def test_label_values(value, verdict):
    assert label_value(value) is verdict


def test_explicit_mapping_for_pairs_and_feedback():
    cols = ["q", "good", "bad", "thumb", "a"]
    m = parse_mapping("q=prompt,good=chosen,bad=rejected", cols)
    assert isinstance(m, PreferenceMapping) and (m.format, m.prompt, m.chosen, m.rejected, m.detected) == (
        "pairs",
        "q",
        "good",
        "bad",
        False,
    )
    assert parse_mapping(m.to_pairs(), cols) == m
    assert parse_mapping(["good=chosen", "bad=rejected"], cols).format == "pair_conversations"
    f = parse_mapping("q=prompt,a=response,thumb=label", cols)
    assert (f.kind, f.label_column, f.response) == ("feedback", "thumb", "a")
    assert parse_mapping(f.to_pairs(), cols) == f
    df = pd.DataFrame([["x"] * len(cols)], columns=cols)
    assert mapping_for(df, "q=prompt,good=chosen,bad=rejected") == m
    with pytest.raises(DataError, match="both a chosen and a rejected"):
        parse_mapping("q=prompt,good=chosen", cols)
    with pytest.raises(DataError, match="needs prompt and response"):
        parse_mapping("q=prompt,thumb=label", cols)
    with pytest.raises(DataError, match="either pairs"):
        parse_mapping("good=chosen,bad=rejected,thumb=label", cols)


def test_unknown_columns_message_names_the_preference_shapes():
    with pytest.raises(DataError, match="prompt,chosen,rejected"):
        detect_format(pd.DataFrame({"name": ["a"], "age": [1]}))


# Validation -----------------------------------------------------------------------------------


def test_pair_findings_with_row_numbers(tmp_path, tok):
    rows = _sums(60)
    rows[1] = ["same answers", "answer 9", "answer  9"]  # row 2: identical (whitespace aside)
    rows[2] = ["no rejected", "answer 1", ""]  # row 3: an empty side
    rows[3] = ["", "answer 1", "answer 2"]  # row 4: no prompt
    rows[4] = ["bad turns", json.dumps([{"role": "user"}]), "answer"]  # row 5: turns without content
    rows[5] = rows[0]  # row 6: a duplicate of row 1
    rows[6] = [rows[0][0], rows[0][2], rows[0][1]]  # row 7: row 1 reversed
    rows[7] = ["what is long", "answer " + "nine " * 60, "answer " + "ten " * 10]  # row 8: cut (chosen more)
    rows[8] = ["word " * 80, "a", "b"]  # row 9: a prompt that fills max length
    table = read_table(write_csv(tmp_path / "p.csv", ["prompt", "chosen", "rejected"], rows))
    report = validate(table, mapping_for(table.df), tok, max_length=64)
    codes = _codes(report)
    expected = {
        "identical": [2],
        "empty_answer": [3],
        "empty_prompt": [4],
        "invalid_json": [5],
        "duplicate_rows": [6],
        "contradicting_rows": [1, 6, 7],
        "too_long": [8],
        "prompt_too_long": [9],
    }
    for code, rows_named in expected.items():
        assert code in codes, (code, codes)
        assert codes[code].rows == rows_named, (code, codes[code])
        assert codes[code].fix and codes[code].severity == "warning"
    assert "1 row has the same answer as chosen and rejected" in codes["identical"].message
    assert "`chosen` or `rejected`" in codes["empty_answer"].message
    long = codes["too_long"].message
    assert "chosen answers lose" in long and "rejected answers" not in long  # only the chosen side is cut
    assert report.ok and report.usable_rows == 60 - 5  # rows 2, 3, 4, 5 and 9 skipped
    assert report.preference[8] is None and report.convs[8] is None
    # The report says what it read, and each side's tokens.
    text = report.to_text()
    assert "preference pairs: prompt, chosen, rejected" in text and "usable pairs" in text
    assert "chosen:" in text and "rejected:" in text
    data = report.to_dict()
    assert data["kind"] == "pairs" and set(data["stats"]["sides"]) == {"chosen", "rejected"}
    assert data["stats"]["sides"]["chosen"]["truncated_rows"] == 1


def test_prompts_that_differ_between_sides_are_named(tmp_path):
    rows = [
        {
            "chosen": _turns(("user", f"q{i}"), ("assistant", "yes")),
            "rejected": _turns(("user", f"q{i}"), ("assistant", "no")),
        }
        for i in range(12)
    ]
    rows[3]["rejected"] = _turns(("user", "something else"), ("assistant", "no"))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    table = read_table(tmp_path / "c.jsonl")
    codes = _codes(validate(table, mapping_for(table.df)))
    assert (
        codes["prompt_mismatch"].rows == [4]
        and "turns before the final answer differ" in codes["prompt_mismatch"].message
    )


def test_too_few_pairs_is_an_error_and_few_a_warning(tmp_path):
    def report(n):
        table = read_table(write_csv(tmp_path / f"p{n}.csv", ["prompt", "chosen", "rejected"], _sums(n)))
        return validate(table, mapping_for(table.df))

    few = report(MIN_PAIRS - 1)
    assert not few.ok and f"needs at least {MIN_PAIRS}" in _codes(few)["too_few_pairs"].message
    some = report(MIN_PAIRS)
    assert some.ok and _codes(some)["few_pairs"].severity == "warning"
    assert "few_pairs" not in _codes(report(FEW_PAIRS)) and "too_few_pairs" not in _codes(report(FEW_PAIRS))
    empty = read_table(write_csv(tmp_path / "e.csv", ["prompt", "chosen", "rejected"], [["q", "a", "a"]] * 3))
    assert _codes(validate(empty, mapping_for(empty.df)))["no_usable_rows"].severity == "error"


def test_feedback_findings(tmp_path, tok):
    rows = [[f"q{i}", f"answer {i}", "yes" if i % 2 else "no"] for i in range(20)]
    rows[2][2] = "meh"  # row 3
    rows[4][2] = ""  # row 5
    rows[6] = ["q5", "answer 5", "no"]  # row 7: row 6's prompt and answer, the opposite label
    table = read_table(write_csv(tmp_path / "f.csv", ["prompt", "completion", "label"], rows))
    report = validate(table, mapping_for(table.df), tok, 64)
    codes = _codes(report)
    assert codes["unknown_label"].rows == [3, 5] and '"meh"' in codes["unknown_label"].message
    assert "prompt=prompt,completion=response" in codes["unknown_label"].fix
    assert codes["contradicting_rows"].rows == [6, 7]
    assert codes["few_rows"].severity == "warning" and "one_sided_labels" not in codes
    assert set(report.side_stats) == {"desirable", "undesirable"}
    one_sided = [[f"q{i}", f"answer {i}", "👍"] for i in range(20)]
    table = read_table(write_csv(tmp_path / "g.csv", ["prompt", "completion", "label"], one_sided))
    codes = _codes(validate(table, mapping_for(table.df)))
    assert codes["one_sided_labels"].severity == "warning" and "marked good" in codes["one_sided_labels"].message
    # A label column that is not a verdict: nothing is trainable, and the fix says how to remap.
    topics = [[f"q{i}", f"a{i}", "geography"] for i in range(20)]
    table = read_table(write_csv(tmp_path / "t.csv", ["prompt", "completion", "label"], topics))
    report = validate(table, mapping_for(table.df))
    assert not report.ok and report.errors()[0].code == "no_usable_rows" and "unknown_label" in _codes(report)


def test_counted_lengths_match_real_tokenization(tok):
    prompts = [_turns(("user", "what is the capital of france")), _turns(("system", "s"), ("user", "hi"))]
    answers = {"a": ["paris", "hello world"]}
    prompt_len, totals = answer_lengths(prompts, answers, tok)
    for i, prompt in enumerate(prompts):
        text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        assert prompt_len[i] == len(tok(text, add_special_tokens=False)["input_ids"])
        ex = tokenize_answer(prompt, answers["a"][i], tok, None)
        assert totals["a"][i] == len(ex.input_ids)


# Tokens ---------------------------------------------------------------------------------------


def test_tokenize_pairs_labels_exactly_the_answers(tok):
    pair_df = pd.DataFrame({"prompt": ["what is two plus two"], "chosen": ["four"], "rejected": ["five or six"]})
    pairs, _ = pair_rows(pair_df, detect_format(pair_df))
    [ex] = tokenize_pairs(pairs, tok, 512)
    assert isinstance(ex, PairExample) and ex.rows() == [ex.chosen, ex.rejected]
    prompt_text = tok.apply_chat_template(pairs[0].prompt, tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    for side, answer in ((ex.chosen, "four"), (ex.rejected, "five or six")):
        assert tok.decode([t for t in side.labels if t != IGNORE_INDEX]) == answer + "<|im_end|>\n"
        assert side.input_ids[: len(prompt_ids)] == prompt_ids  # the same prompt on both sides
        assert all(t == IGNORE_INDEX for t in side.labels[: len(prompt_ids)])
        assert side.labels[len(prompt_ids) :] == side.input_ids[len(prompt_ids) :]
        assert not side.truncated


def test_truncation_cuts_the_answer_end_never_the_prompt(tok):
    long_answer = "one two three four five six seven eight nine ten " * 4
    df = pd.DataFrame({"prompt": ["count"], "chosen": [long_answer], "rejected": ["ten"]})
    pairs, _ = pair_rows(df, detect_format(df))
    full = tokenize_pairs(pairs, tok, 10_000)[0]
    prompt_len = full.chosen.labels.index(next(t for t in full.chosen.labels if t != IGNORE_INDEX))
    limit = prompt_len + 5
    [cut] = tokenize_pairs(pairs, tok, limit)
    assert cut.chosen.truncated and cut.truncated and len(cut.chosen.input_ids) == limit
    assert cut.chosen.input_ids == full.chosen.input_ids[:limit] and cut.chosen.trained_tokens == 5
    assert not cut.rejected.truncated and cut.rejected.input_ids == full.rejected.input_ids
    assert tokenize_pairs(pairs, tok, prompt_len) == []  # no room left for an answer: the pair is dropped


# prepare --------------------------------------------------------------------------------------


def test_prepare_pairs_keeps_prompts_apart(tmp_path, tok):
    rows = []
    for i in range(40):  # 40 prompts, each answered by two or three pairs
        rows += [[f"question {i}", f"right {i}", f"wrong {i} {j}"] for j in range(2 + i % 2)]
    path = write_csv(tmp_path / "p.csv", ["prompt", "chosen", "rejected"], rows)
    data = prepare(DataConfig(path=str(path), max_length=64, eval_fraction=0.2), tok, seed=3)
    assert data.kind == "pairs" and data.report.kind == "pairs"
    assert data.train and data.eval and all(isinstance(e, PairExample) for e in data.train + data.eval)
    assert len(data.train) + len(data.eval) == len(rows)

    def prompts(examples):
        return {
            tok.decode([t for t, lab in zip(e.chosen.input_ids, e.chosen.labels) if lab == IGNORE_INDEX])
            for e in examples
        }

    assert not prompts(data.train) & prompts(data.eval)


def test_prepare_feedback_and_sft_kinds(tmp_path, tok, instruction_csv):
    rows = [[f"q{i}", f"answer {i}", "up" if i % 3 else "down"] for i in range(30)]
    path = write_csv(tmp_path / "f.csv", ["prompt", "completion", "label"], rows)
    data = prepare(DataConfig(path=str(path), max_length=64, eval_fraction=0.2), tok, seed=0)
    assert data.kind == "feedback" and all(isinstance(e, FeedbackExample) for e in data.train + data.eval)
    assert {e.desirable for e in data.train} == {True, False}
    assert sum(len(e.rows()) for e in data.train) == len(data.train)
    assert prepare(DataConfig(path=str(instruction_csv), max_length=64), tok, seed=0).kind == "sft"


def test_prepare_refuses_too_few_pairs(tmp_path, tok):
    path = write_csv(tmp_path / "p.csv", ["prompt", "chosen", "rejected"], _sums(3))
    with pytest.raises(DataError, match="needs at least"):
        prepare(DataConfig(path=str(path), max_length=64), tok, seed=0)


def test_cli_validate_prints_the_preference_report(tmp_path, tiny_model_dir, capsys):
    path = write_csv(tmp_path / "p.csv", ["prompt", "chosen", "rejected"], _sums(60))
    assert main(["validate", str(path), "--model", str(tiny_model_dir), "--max-length", "64"]) == 0
    out = capsys.readouterr().out
    assert "preference pairs: prompt, chosen, rejected" in out and "OK: training can proceed." in out
    assert main(["validate", str(path), "--model", str(tiny_model_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "pairs"


# The bundled sample ---------------------------------------------------------------------------


def _make_samples():
    spec = importlib.util.spec_from_file_location("make_samples", ROOT / "benchmarks" / "make_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_sample_is_balanced_in_length_and_regenerates(tok):
    make_samples = _make_samples()
    table = read_table(SAMPLE)
    rows = [tuple(r) for r in table.df[["prompt", "chosen", "rejected"]].itertuples(index=False)]
    assert rows == make_samples.preferences(make_samples.random.Random(25))  # the script writes this file
    assert len(rows) == 300 and len({p for p, _, _ in rows}) == 300
    balance = make_samples.length_balance(rows)
    assert abs(balance["mean_difference_share"]) < 0.03  # length alone cannot tell the sides apart
    assert abs(balance["chosen_longer"] - balance["chosen_shorter"]) < 0.1
    report = validate(table, mapping_for(table.df), tok, 512)
    assert report.kind == "pairs" and report.ok and report.usable_rows == 300
    assert [f.code for f in report.findings] == [], report.findings
    assert len({prompt_key(p.conversation()) for p in report.preference}) == 300
