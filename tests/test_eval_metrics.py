"""Task metrics: known answers for every metric, never raising on bad input, the picker on shapes
the bundled samples have and shapes they do not, the label report, and custom functions."""

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from studio.evaluation.metrics import NAMES, metric_by_name
from studio.evaluation.shapes import infer_pattern, label_report, pick_metrics

pytestmark = pytest.mark.unit

SAMPLES = Path(__file__).resolve().parents[1] / "studio" / "templates" / "samples"


def score(name, answer, reference, **kw):
    return metric_by_name(name, **kw).score(answer, reference)


# --- known answers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, answer, reference, expected",
    [
        ("exact_match", "  Paris \n", "paris", 1.0),
        ("exact_match", "The  capital\tis PARIS", "the capital is paris", 1.0),
        ("exact_match", "Paris.", "Paris", 0.0),
        ("exact_match", "Ｐａｒｉｓ", "paris", 1.0),  # full-width letters: NFKC
        ("contains", "I think it is PARIS, France", "paris", 1.0),
        ("contains", "Lyon", "paris", 0.0),
        ("contains", "", "", 1.0),
        ("contains", "anything", "", 0.0),  # an empty reference is not in everything
        ("label", "Positive.", "positive", 1.0),
        ("label", '"negative"', "Negative", 1.0),
        ("label", "positive, I think", "positive", 0.0),
        ("numeric", "The answer is 26 apples", "26", 1.0),
        ("numeric", "ANSWER: 26\nWHY: 5 + 21 = 26.", "ANSWER: 26\nWHY: 5 + 21 = 26.", 1.0),
        ("numeric", "1,234.5", "1234.5", 1.0),
        ("numeric", "-3", "-3.0", 1.0),
        ("numeric", "3.0000001", "3", 1.0),  # relative tolerance 1e-6
        ("numeric", "3.00001", "3", 0.0),
        ("numeric", "about 25 or 26", "26", 0.0),  # the first number counts
        ("numeric", "no number here", "26", 0.0),
        ("numeric", "0", "0", 1.0),
        ("json", '{"answer": "Paris", "confidence": 0.9}', '{"confidence": 0.9, "answer": "paris"}', 1.0),
        ("json", '{"answer": "Paris", "confidence": 0.5}', '{"answer": "Paris", "confidence": 0.9}', 0.5),
        ("json", '{"answer": "Paris"}', '{"answer": "Paris", "confidence": 0.9}', 0.0),  # keys differ
        ("json", '{"answer": "Paris", "extra": 1}', '{"answer": "Paris"}', 0.0),
        ("json", '```json\n{"answer": 1}\n```', '{"answer": 1}', 0.0),  # not JSON as written
        ("json", '{"ok": true}', '{"ok": 1}', 0.0),  # true is not 1
        ("json", "[1, 2, 3]", "[1, 2, 3]", 1.0),
        ("json", "[1, 2]", "[1, 2, 3]", 0.0),
        ("json_valid", '{"answer": "Lyon", "confidence": 0}', '{"answer": "Paris", "confidence": 0.9}', 1.0),
        ("json_valid", '{"answer": "Lyon"}', '{"answer": "Paris", "confidence": 0.9}', 0.0),
        ("json_valid", "{answer: Lyon}", '{"answer": "Paris"}', 0.0),
        ("rouge_l", "the cat sat on the mat", "the cat sat on the mat", 1.0),
        ("rouge_l", "the cat sat", "the cat sat on the mat", 2 * (1.0 * 0.5) / 1.5),  # P 1, R 1/2
        ("rouge_l", "dog", "the cat sat", 0.0),
        ("rouge_l", "bonne journée", "Au revoir et bonne journée !", 2 * (1.0 * 0.4) / 1.4),  # é kept
        ("rouge_l", "天气很好", "今天天气很好", 2 * (1.0 * 4 / 6) / (1 + 4 / 6)),  # each CJK character a word
        ("chrf", "Au revoir et bonne journée !", "Au revoir et bonne journée !", 1.0),
        ("chrf", "", "Au revoir", 0.0),
        ("chrf", "xyz", "Au revoir", 0.0),
    ],
)
def test_known_answers(name, answer, reference, expected):
    assert score(name, answer, reference) == pytest.approx(expected, abs=1e-9)


def test_chrf_matches_sacrebleu_and_ranks_closer_answers_higher():
    from sacrebleu.metrics import CHRF

    ref = "La capitale de ce pays est Accra."
    near, far = "La capitale est Accra.", "Je ne sais pas."
    assert score("chrf", near, ref) == pytest.approx(CHRF().sentence_score(near, [ref]).score / 100)
    assert 0 < score("chrf", far, ref) < score("chrf", near, ref) < 1


def test_regex_typed_by_the_user():
    m = metric_by_name("regex", pattern=r"^ANSWER: \d+$")
    assert m.pattern == r"^ANSWER: \d+$" and r"^ANSWER: \d+$" in m.description
    assert m.score("ANSWER: 42\n", "") == 1.0  # surrounding whitespace is ignored
    assert m.score("The ANSWER: 42", "") == 0.0
    assert metric_by_name("regex", pattern="yes|no").score("well, yes", "") == 1.0  # searched, not anchored


def test_json_schema_gates_the_fields():
    schema = json.dumps(
        {"type": "object", "required": ["answer", "confidence"], "properties": {"confidence": {"type": "number"}}}
    )
    m = metric_by_name("json", schema=schema)
    assert m.name == "json" and m.schema == schema and "schema" in m.description
    ref = '{"answer": "Paris", "confidence": 0.9}'
    assert m.score(ref, ref) == 1.0
    assert m.score('{"answer": "Paris", "confidence": "high"}', ref) == 0.0  # the schema refuses it
    assert m.score('{"answer": "Lyon", "confidence": 0.9}', ref) == 0.5
    assert m.score('{"answer": "x", "confidence": 1}', "not json") == 1.0  # no JSON reference: the schema decides
    assert m.errors == 0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "answer, reference",
    [
        ("", "ref"),
        ("ref", ""),
        ("", ""),
        ("None", "null"),
        (None, "x"),
        (b"\xff\xfe", "x"),
        (42, "42"),
        ("\ud800 lone surrogate", "\ud800"),
        ("日本語の答え 🙂", "日本語の答え"),
        ("x" * 1_500_000, "x"),
        ("9" * 100_000, "9"),
        ("[" * 50_000, "[1]"),
        ("a" * 5000 + "!", "a"),
        ('{"a": ' * 5000, '{"a": 1}'),
    ],
)
def test_scores_never_raise(name, answer, reference):
    m = metric_by_name(name, pattern=r"^(a+)+$")  # the pattern backtracks: a timeout, not a hang
    value = m.score(answer, reference)
    assert 0.0 <= value <= 1.0
    assert m.errors <= (1 if name == "regex" else 0)  # built-in metrics score bad answers 0 without errors


def test_rouge_runs_offline_without_nltk_data(monkeypatch):
    import nltk

    def refuse(*args, **kwargs):
        raise AssertionError("rouge-score asked nltk for data")

    monkeypatch.setattr(nltk, "download", refuse)
    monkeypatch.setattr(nltk.data, "load", refuse)
    monkeypatch.setattr(nltk.data, "find", refuse)
    assert score("rouge_l", "a b c d", "a b x d") == pytest.approx(0.75)


# --- by name, and bad names ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kw, words",
    [
        ("rouge", {}, ["no metric named 'rouge'", "did you mean rouge_l", "custom:<module>:<function>"]),
        ("regex", {}, ["needs a pattern"]),
        ("regex", {"pattern": "(unclosed"}, ["'(unclosed' is not valid", "fix it"]),
        ("json", {"schema": "{not json"}, ["not valid JSON", "paste a JSON object"]),
        ("json", {"schema": '{"type": "no-such-type"}'}, ["not a valid schema", "fix it"]),
        ("json", {"schema": "[1, 2]"}, ["is a JSON object"]),
        ("custom:nosuchmodule_for_tests:f", {}, ["Cannot import 'nosuchmodule_for_tests'", "PYTHONPATH"]),
        ("custom:json:no_such_function", {}, ["json has no function 'no_such_function'", "dumps", "(answer: str"]),
        ("custom:onlymodule", {}, ["custom:<module>:<function>"]),
    ],
)
def test_bad_metric_settings_say_what_and_how_to_fix(name, kw, words):
    with pytest.raises(ValueError) as info:
        metric_by_name(name, **kw)
    for word in words:
        assert word in str(info.value)


def test_pattern_and_schema_are_ignored_by_metrics_that_do_not_take_them():
    m = metric_by_name("exact_match", pattern="(", schema="{")
    assert m.score("a", "a") == 1.0 and m.pattern is None and m.schema is None


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    """A programmer's metric module, importable by name from tmp_path."""
    name = "studio_test_custom_metric"
    (tmp_path / f"{name}.py").write_text(
        "def score(answer, reference):\n"
        "    '''Answers that start with the reference.'''\n"
        "    if answer == 'boom':\n"
        "        raise RuntimeError('cannot score boom')\n"
        "    if answer == 'nan':\n"
        "        return float('nan')\n"
        "    if answer == 'big':\n"
        "        return 7\n"
        "    return answer.startswith(reference)\n"
        "broken = 'not a function'\n"
    )
    (tmp_path / "studio_test_bad_import.py").write_text("raise ImportError('needs a package you lack')\n")
    monkeypatch.chdir(tmp_path)  # found in the current folder, as a console script would run it
    yield name
    for module in (name, "studio_test_bad_import"):
        sys.modules.pop(module, None)


def test_custom_metric_scores_and_counts_the_rows_that_fail(custom_module):
    m = metric_by_name(f"custom:{custom_module}:score")
    assert m.name == f"custom:{custom_module}:score" and m.description == "Answers that start with the reference."
    assert [m.score(a, "ab") for a in ("abc", "xab", "boom", "nan", "big")] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert m.errors == 3
    note = m.error_note()
    assert note.startswith(f"custom:{custom_module}:score failed on 3 rows, scored 0 (RuntimeError: cannot score boom)")
    assert "other metrics are unaffected" in note
    other = metric_by_name("exact_match")  # the others are unaffected
    assert other.score("boom", "boom") == 1.0 and other.errors == 0 and other.error_note() is None


def test_custom_metric_that_cannot_be_had(custom_module):
    with pytest.raises(ValueError, match="has no function 'broken'; it has score"):
        metric_by_name(f"custom:{custom_module}:broken")
    with pytest.raises(ValueError, match="Importing 'studio_test_bad_import' .* failed: ImportError: needs a package"):
        metric_by_name("custom:studio_test_bad_import:score")


# --- the picker ---------------------------------------------------------------------------


def _names(references):
    metrics, reason = pick_metrics(references)
    return [m.name for m in metrics], reason


def test_picks_json_for_json_objects():
    refs = [json.dumps({"answer": f"a{i}", "confidence": i / 10}) for i in range(10)]
    names, reason = _names(refs)
    assert names == ["json", "json_valid", "exact_match"]
    assert (
        reason == "Your answers are JSON objects with keys answer, confidence: valid JSON, same keys, per-field match."
    )


def test_picks_labels_for_a_small_repeated_set():
    refs = ["positive", "negative", "neutral", "Positive", "negative", "positive"] * 5
    names, reason = _names(refs)
    assert names == ["label", "exact_match"]
    assert reason.startswith("Your answers come from 3 labels (negative, neutral, positive)")


def test_picks_numeric_for_numbers_and_label_too_when_they_repeat():
    assert _names(["12", "3.5", "-7", "1,024", "88", "0.001"])[0] == ["numeric", "exact_match"]
    names, reason = _names(["1", "2", "3", "4", "5"] * 6)  # ratings
    assert names == ["numeric", "label", "exact_match"] and "label accuracy too" in reason


def test_picks_a_format_for_multi_line_structures_the_samples_lack():
    refs = [f"Title: item {i}\nPrice: {i * 3} EUR\nIn stock: {'yes' if i % 2 else 'no'}" for i in range(12)]
    names, reason = _names(refs)
    assert names == ["regex", "rouge_l", "contains"]
    pattern = pick_metrics(refs)[0][0].pattern
    assert pattern == r"^Title: item \d+\nPrice: \d+ EUR\nIn stock: .+$"
    assert "Title: item # / Price: # EUR / In stock: …" in reason


def test_picks_free_text_for_prose_and_multi_turn_replies():
    refs = [
        "The mitochondria is the powerhouse of the cell.",
        "Photosynthesis turns light into chemical energy.",
        "The French Revolution began in 1789.",
        "Water boils at 100 degrees Celsius at sea level.",
        "A haiku has three lines.",
        "The mitochondria is the powerhouse of the cell.",
    ]
    names, reason = _names(refs)
    assert names == ["rouge_l", "chrf", "exact_match"]
    assert reason.startswith("Your answers are free text (5 different among 6)")
    assert infer_pattern(refs) is None  # "The ..." twice is no format


@pytest.mark.parametrize(
    "refs, expected",
    [
        ([f"ANSWER: {i}\nWHY: because {i}" for i in range(5)], r"^ANSWER: \d+\nWHY: because \d+$"),
        (["Q1 | yes", "Q2 | no", "Q3 | maybe"], r"^Q\d+ \| .+$"),
        (["A: x\n\nB: y", "A: z\n\nB: w", "A: q\n\nB: r"], r"^A: .+\n\nB: .+$"),
        (["[ok] done", "[ok] ", "[ok] fine"], r"^\[ok\].*$"),
        (["a: 1\nb", "a: 2", "a: 3"], None),  # line counts differ
        (["x: 1", "y: 2", "z: 3"], None),  # no shared start
        (["Hello there", "Hello you", "Hello me"], None),  # a shared word is no marker
        (["ANSWER: 1", "ANSWER: 2"], None),  # too few to infer from
    ],
)
def test_infer_pattern(refs, expected):
    assert infer_pattern(refs) == expected
    if expected:
        m = metric_by_name("regex", pattern=expected)
        assert all(m.score(r, "") == 1.0 for r in refs)


def test_degenerate_reference_sets():
    assert _names([])[0] == ["exact_match"]
    assert _names(["", "  "])[0] == ["exact_match"]
    names, reason = _names(["yes"] * 10)  # a label set of one
    assert names == ["exact_match", "contains"] and "no label set" in reason


def _samples() -> dict[str, list[str]]:
    chats = [json.loads(line)["messages"] for line in (SAMPLES / "chat.jsonl").read_text().splitlines() if line]
    return {
        "instructions": pd.read_csv(SAMPLES / "instructions.csv")["output"].tolist(),
        "chat": [[m["content"] for m in msgs if m["role"] == "assistant"][-1] for msgs in chats],
        "text": pd.read_csv(SAMPLES / "text.csv")["text"].tolist(),
    }


@pytest.mark.parametrize(
    "sample, names, pattern",
    [
        ("instructions", ["regex", "rouge_l", "contains"], r"^ANSWER: .+\nWHY: .+$"),
        ("chat", ["rouge_l", "chrf", "exact_match"], None),
        ("text", ["regex", "rouge_l", "contains"], r"^LOG \d+/\d+ \| .+$"),
    ],
)
def test_bundled_samples(sample, names, pattern):
    refs = _samples()[sample]
    metrics, _ = pick_metrics(refs)
    assert [m.name for m in metrics] == names and metrics[0].pattern == pattern
    # The references score 1 against themselves; a reference from another row scores lower on
    # content, and an answer in no format scores 0 on the format.
    shifted = refs[1:] + refs[:1]
    for m in metrics:
        assert all(m.score(r, r) == 1.0 for r in refs), m.name
    for m in metrics[1:] if pattern else metrics:
        assert sum(m.score(a, r) for a, r in zip(shifted, refs)) < len(refs), m.name
    if pattern:
        assert all(metrics[0].score(a, r) == 1.0 for a, r in zip(shifted, refs))  # right format, wrong answer
        assert metrics[0].score("I think it is 26.", refs[0]) == 0.0


# --- labels -------------------------------------------------------------------------------


def test_label_report_known_answer():
    refs = ["cat", "cat", "cat", "dog", "dog", "bird"]
    answers = ["Cat.", "dog", "cat", "dog", "fish", "bird"]
    report = label_report(answers, refs)
    assert report["labels"] == ["bird", "cat", "dog"]
    assert report["confusion"] == [[1, 0, 0, 0], [0, 2, 1, 0], [0, 0, 1, 1]]  # last column: other
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["other"] == 1
    cat, dog = report["per_label"]["cat"], report["per_label"]["dog"]
    assert cat == {"precision": 1.0, "recall": pytest.approx(2 / 3), "f1": pytest.approx(0.8), "support": 3}
    assert dog["precision"] == 0.5 and dog["recall"] == 0.5 and dog["f1"] == 0.5 and dog["support"] == 2
    assert report["macro_f1"] == pytest.approx((1.0 + 0.8 + 0.5) / 3)
    assert label_report(["no"] * 3, ["yes"] * 3)["per_label"]["yes"]["precision"] == 0.0  # never answered
    with pytest.raises(ValueError, match="2 answers for 3 references"):
        label_report(["a", "b"], ["a", "b", "c"])


def test_score_rows():
    m = metric_by_name("exact_match")
    assert m.score_rows(["a", "B", "c"], ["a", "b", "x"]) == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="one answer per row"):
        m.score_rows(["a"], ["a", "b"])


def test_a_pattern_that_runs_too_long_scores_0_and_is_counted(monkeypatch):
    import studio.evaluation.metrics as metrics

    monkeypatch.setattr(metrics, "REGEX_TIMEOUT_S", 1e-6)
    m = metric_by_name("regex", pattern=r"(a|b)*c")
    assert m.score("ab" * 500_000, "") == 0.0 and m.errors == 1
    assert "TimeoutError: the pattern took over 1e-06 s on one answer" in m.error_note()
