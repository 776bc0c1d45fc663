"""Per-row task metrics on generated answers.

Every metric scores one row, ``score(answer, reference) -> float`` in [0, 1] (1 = right), and
never raises: a bad answer (empty, not JSON, no number, huge, not text) scores 0.0. Metrics:
``exact_match``, ``contains``, ``json``, ``json_valid``, ``regex``, ``label``, ``numeric``,
``rouge_l``, ``chrf``. ROUGE-L and chrF call ``rouge-score`` and ``sacrebleu`` directly
(``evaluate.load`` fetches metric scripts from the hub at run time); JSON Schemas go to
``jsonschema``. Which ones fit a set of references: studio/evaluation/shapes.py.

A programmer's own metric is ``custom:<module>:<function>``, imported by :func:`metric_by_name`
(a module in the current folder is found too). Name it on the CLI or in the server's own
settings, never from a run's stored config or an imported zip (those are uploads)::

    # mymetrics.py
    def score(answer: str, reference: str) -> float:
        '''First line of the docstring is the description the page shows.'''
        return float(answer.strip().lower() == reference.strip().lower())

``finetune-studio eval RUN --metric custom:mymetrics:score``. The function gets two ``str`` and
returns a number in [0, 1] (``bool`` is fine). A row where it raises, or returns anything else,
scores 0.0 and is counted in :attr:`Metric.errors`; :meth:`Metric.error_note` says it in a
sentence. The other metrics are unaffected.
"""

from __future__ import annotations

import difflib
import importlib
import json
import math
import os
import re
import sys
import threading
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable

import regex  # the `re` twin with a timeout, so a user's pattern cannot hang an evaluation

__all__ = ["Metric", "NAMES", "metric_by_name"]

NAMES = ("exact_match", "contains", "json", "json_valid", "regex", "label", "numeric", "rouge_l", "chrf")
MAX_LABELS = 20  # more distinct references than this is free text, not a label set
MAX_OVERLAP_CHARS = 8_000  # ROUGE-L's LCS is quadratic in pure Python; longer text is cut here
REGEX_TIMEOUT_S = 1.0
_MAX_TEXT_CHARS = 1_000_000  # a metric reads this much of an answer; the rest is ignored


# --- reading text -------------------------------------------------------------------------

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?")
_PUNCT = "\"'`.,;:!?()[]{}*_ \t\n"
_MAX_NUMBER_CHARS = 400  # float() of a million digits is slow and means nothing; longer is "no number"


def normalise(text: str) -> str:
    """Compared text: Unicode NFKC, case folded, runs of whitespace as one space, ends stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def label_key(text: str) -> str:
    """A label as compared: normalised, quotes, brackets and end punctuation stripped ("Positive." = "positive")."""
    return normalise(text).strip(_PUNCT)


def parse_number(text: str, *, whole: bool = False) -> float | None:
    """The first number in the text ("1,234.5" = 1234.5; a trailing % is ignored), or None.
    With ``whole``, the text must be that number and nothing else."""
    text = text.strip()
    found = _NUMBER.fullmatch(text.rstrip("%").strip()) if whole else _NUMBER.search(text)
    if found is None or len(found.group()) > _MAX_NUMBER_CHARS:
        return None
    try:
        return float(found.group().replace(",", ""))
    except (ValueError, OverflowError):
        return None


def parse_json(text: str) -> tuple[bool, Any]:
    """(True, value) when the whole text (surrounding whitespace aside) is JSON; (False, None) otherwise."""
    try:
        return True, json.loads(text)
    except (ValueError, RecursionError, TypeError):
        return False, None


class _Errors:
    """Rows whose score raised, and the first error (a lock: rows may be scored from threads)."""

    def __init__(self) -> None:
        self.count, self.first, self._lock = 0, "", threading.Lock()

    def add(self, message: str) -> None:
        with self._lock:
            self.count += 1
            self.first = self.first or message


@dataclass(frozen=True)
class Metric:
    """One per-row metric: ``score(answer, reference)`` in [0, 1], never raising."""

    name: str
    """``exact_match``, ``contains``, ``json``, ..., or ``custom:<module>:<function>``."""
    description: str
    """One plain sentence for the page: what a 1 means."""
    fn: Callable[[str, str], Any] = field(repr=False, compare=False)
    """The row scorer; whatever it raises or returns outside [0, 1] counts as an error and scores 0."""
    pattern: str | None = None
    """The regular expression (``regex`` only), to store with the scores and rebuild the metric."""
    schema: str | None = None
    """The JSON Schema text (``json`` only)."""
    _errors: _Errors = field(default_factory=_Errors, init=False, repr=False, compare=False)

    def score(self, answer: Any, reference: Any) -> float:
        """The row's score in [0, 1]; 0.0 (and one more :attr:`errors`) where the scorer fails."""
        answer, reference = as_text(answer), as_text(reference)
        try:
            value = self.fn(answer, reference)
            if isinstance(value, str) or not hasattr(value, "__float__"):  # bool, int, numpy floats pass
                raise TypeError(f"returned {type(value).__name__} {str(value)[:40]!r}, not a number")
            value = float(value)
            if not 0.0 <= value <= 1.0:  # NaN fails this too
                raise ValueError(f"returned {value!r}, outside 0 to 1")
        except Exception as exc:  # a user's metric may raise anything; the row scores 0, counted
            self._errors.add(f"{type(exc).__name__}: {exc}"[:300])
            return 0.0
        return value

    def score_rows(self, answers: list[Any], references: list[Any]) -> list[float]:
        """Scores of each row, in order."""
        if len(answers) != len(references):
            raise ValueError(f"{len(answers)} answers for {len(references)} references: give one answer per row.")
        return [self.score(a, r) for a, r in zip(answers, references)]

    @property
    def errors(self) -> int:
        """How many rows raised (or returned no number in [0, 1]) so far, base and adapter together."""
        return self._errors.count

    def error_note(self) -> str | None:
        """A sentence for the page when rows failed, naming the first error; None when none did."""
        if not self._errors.count:
            return None
        rows = "1 row" if self._errors.count == 1 else f"{self._errors.count} rows"
        return f"{self.name} failed on {rows}, scored 0 ({self._errors.first}); the other metrics are unaffected."


def as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    elif not isinstance(value, str):
        value = str(value)
    return value[:_MAX_TEXT_CHARS]


# --- the scorers --------------------------------------------------------------------------


def _exact(answer: str, reference: str) -> float:
    return float(normalise(answer) == normalise(reference))


def _contains(answer: str, reference: str) -> float:
    ref = normalise(reference)
    # An empty reference is "contained" in everything; say so only for an empty answer.
    return float(ref in normalise(answer)) if ref else float(not normalise(answer))


def _label(answer: str, reference: str) -> float:
    return float(label_key(answer) == label_key(reference))


def _numeric(answer: str, reference: str) -> float:
    want, got = parse_number(reference), parse_number(answer)
    if want is None or got is None:
        return 0.0
    return float(got == want or math.isclose(got, want, rel_tol=1e-6))


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return normalise(a) == normalise(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or math.isclose(a, b, rel_tol=1e-6)
    return a == b


def _fields(answer: Any, reference: Any) -> float:
    """Per-field share: 0 unless the answer has the reference's keys; then the share of equal fields."""
    if isinstance(reference, dict):
        if not isinstance(answer, dict) or set(answer) != set(reference):
            return 0.0
        if not reference:
            return 1.0
        return sum(_same_value(answer[k], v) for k, v in reference.items()) / len(reference)
    return float(_same_value(answer, reference))


def _json_scorer(validator: Any = None) -> Callable[[str, str], float]:
    def score(answer: str, reference: str) -> float:
        ok, got = parse_json(answer)
        if not ok:
            return 0.0
        if validator is not None:
            try:
                if not validator.is_valid(got):
                    return 0.0
            except RecursionError:
                return 0.0
        has_ref, want = parse_json(reference)
        if not has_ref:  # a schema alone says what is right; without one there is nothing to match
            return 1.0 if validator is not None else 0.0
        try:
            return _fields(got, want)
        except RecursionError:
            return 0.0

    return score


def _json_valid(answer: str, reference: str) -> float:
    ok, got = parse_json(answer)
    has_ref, want = parse_json(reference)
    if not ok:
        return 0.0
    if has_ref and isinstance(want, dict):
        return float(isinstance(got, dict) and set(got) == set(want))
    return 1.0


def _regex_scorer(compiled: Any) -> Callable[[str, str], float]:
    def score(answer: str, reference: str) -> float:
        text = answer.replace("\r\n", "\n").strip()
        try:
            return float(compiled.search(text, timeout=REGEX_TIMEOUT_S) is not None)
        except TimeoutError:
            raise TimeoutError(f"the pattern took over {REGEX_TIMEOUT_S:g} s on one answer") from None

    return score


_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"  # kana, CJK ideographs, hangul
_WORDS = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")


def _overlap_tokens(text: str) -> list[str]:
    # rouge-score's own tokenizer keeps only [a-z0-9]: French accents split words and Chinese
    # vanishes. Words are letter/digit runs; each CJK character is a word of its own.
    return _WORDS.findall(unicodedata.normalize("NFKC", text).casefold())


class _Tokenizer:  # rouge-score's Tokenizer protocol: an object with tokenize()
    def tokenize(self, text: str) -> list[str]:
        return _overlap_tokens(text)


def _rouge_scorer() -> Callable[[str, str], float]:
    from rouge_score import rouge_scorer  # imports nltk's stemmer module only; nothing is downloaded

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=_Tokenizer())

    def score(answer: str, reference: str) -> float:
        answer, reference = answer[:MAX_OVERLAP_CHARS], reference[:MAX_OVERLAP_CHARS]
        if not _overlap_tokens(reference) or not _overlap_tokens(answer):
            return _exact(answer, reference)
        return float(scorer.score(reference, answer)["rougeL"].fmeasure)

    return score


def _chrf_scorer() -> Callable[[str, str], float]:
    from sacrebleu.metrics import CHRF

    chrf = CHRF()  # chrF2: character 6-grams, recall weighted twice; one per metric (it caches references)

    def score(answer: str, reference: str) -> float:
        answer, reference = answer[:MAX_OVERLAP_CHARS], reference[:MAX_OVERLAP_CHARS]
        if not answer.strip() or not reference.strip():
            return _exact(answer, reference)
        return min(1.0, max(0.0, chrf.sentence_score(answer, [reference]).score / 100.0))

    return score


# --- by name ------------------------------------------------------------------------------

_DESCRIPTIONS = {
    "exact_match": "the answer equals the reference, ignoring case and spacing",
    "contains": "the answer contains the reference, ignoring case and spacing",
    "json": "valid JSON with the reference's keys; the share of fields equal to the reference's",
    "json_valid": "valid JSON with the same keys as the reference (the format, not the values)",
    "label": "the answer is the reference's label, ignoring case, spacing and surrounding punctuation",
    "numeric": "the first number in the answer equals the reference's (to 1 part in a million)",
    "rouge_l": "ROUGE-L F1: the longest run of the reference's words the answer keeps in order",
    "chrf": "chrF: character n-grams shared with the reference, recall weighted twice (case counts)",
}
_SIMPLE = {
    "exact_match": _exact,
    "contains": _contains,
    "label": _label,
    "numeric": _numeric,
    "json_valid": _json_valid,
}


def metric_by_name(name: str, *, pattern: str | None = None, schema: str | None = None) -> Metric:
    """The metric the user named.

    ``pattern`` is used by ``regex`` (searched in the answer, surrounding whitespace ignored:
    anchor it with ``^``/``$``), ``schema`` by ``json`` (the answer must pass the schema, then
    its fields are matched as usual; a reference that is not JSON leaves the schema alone to
    decide); other metrics ignore both.

    Raises:
        ValueError: a sentence naming the problem and the fix, for an unknown name, a missing or
            invalid regex, a JSON Schema that does not parse, or a custom function that cannot
            be imported.

    Example:
        >>> metric_by_name("regex", pattern=r"^ANSWER: .+$").score("ANSWER: 4", "ANSWER: 5")
        1.0
    """
    name = (name or "").strip()
    if name.startswith("custom:"):
        return _custom(name)
    if name in _SIMPLE:
        return Metric(name, _DESCRIPTIONS[name], _SIMPLE[name])
    if name == "rouge_l":
        return Metric(name, _DESCRIPTIONS[name], _rouge_scorer())
    if name == "chrf":
        return Metric(name, _DESCRIPTIONS[name], _chrf_scorer())
    if name == "regex":
        return _regex_metric(pattern)
    if name == "json":
        if schema is None or not schema.strip():
            return Metric(name, _DESCRIPTIONS[name], _json_scorer())
        return _schema_metric(schema)
    close = difflib.get_close_matches(name, NAMES, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise ValueError(
        f"There is no metric named {name!r}; {hint}choose one of {', '.join(NAMES)}, "
        "or name your own function as custom:<module>:<function>."
    )


def _regex_metric(pattern: str | None) -> Metric:
    if not pattern:
        raise ValueError(
            "The regex metric needs a pattern: type one (such as ^ANSWER: .+$), "
            "or let the metrics be picked from the references, which infers one."
        )
    try:
        compiled = regex.compile(pattern, flags=regex.VERSION0)
    except (regex.error, TypeError, ValueError, OverflowError) as exc:
        raise ValueError(
            f"The regular expression {pattern!r} is not valid ({exc}); fix it or leave it empty."
        ) from None
    shown = pattern if len(pattern) <= 80 else pattern[:77] + "..."
    return Metric("regex", f"the answer matches the pattern {shown}", _regex_scorer(compiled), pattern=pattern)


def _schema_metric(schema: str) -> Metric:
    import jsonschema

    try:
        parsed = json.loads(schema)
    except ValueError as exc:
        raise ValueError(
            f"The JSON Schema is not valid JSON ({exc}); paste a JSON object such as "
            '{"type": "object", "required": ["answer"]}.'
        ) from None
    if not isinstance(parsed, (dict, bool)):
        raise ValueError(f'A JSON Schema is a JSON object (got {type(parsed).__name__}); such as {{"type": "object"}}.')
    cls = jsonschema.validators.validator_for(parsed)
    try:
        cls.check_schema(parsed)
    except jsonschema.exceptions.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "the top level"
        raise ValueError(f"The JSON Schema is not a valid schema at {where}: {exc.message}; fix it there.") from None
    return Metric(
        "json",
        "valid JSON that your schema accepts; the share of fields equal to the reference's",
        _json_scorer(cls(parsed)),
        schema=schema,
    )


def _custom(name: str) -> Metric:
    parts = name.split(":")
    if len(parts) != 3 or not all(p.strip() for p in parts[1:]):
        raise ValueError(
            f"{name!r} does not name a function: write custom:<module>:<function>, "
            "such as custom:mymetrics:score for score() in mymetrics.py."
        )
    module_name, func_name = parts[1].strip(), parts[2].strip()
    try:
        module = _import(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(
            f"Cannot import {module_name!r} for {name} ({exc}); put {module_name}.py in the current folder "
            "or on PYTHONPATH."
        ) from None
    except Exception as exc:  # importing runs the user's module; any error is theirs to read
        raise ValueError(f"Importing {module_name!r} for {name} failed: {type(exc).__name__}: {exc}.") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))[:10]
        raise ValueError(
            f"{module_name} has no function {func_name!r}; it has {', '.join(found) or 'no public functions'}. "
            "Name one that takes (answer: str, reference: str) and returns a number in [0, 1]."
        )
    doc = (getattr(fn, "__doc__", None) or "").strip().splitlines()
    return Metric(name, doc[0].strip() if doc else f"your function {module_name}.{func_name}", fn)


def _import(module_name: str):
    importlib.invalidate_caches()  # a module written since start-up (a notebook, a test) is found
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # A console script does not put the current folder on sys.path; `python -m` does. Look there too.
        if exc.name != module_name.split(".")[0] or os.getcwd() in sys.path:
            raise
        sys.path.insert(0, os.getcwd())
        try:
            return importlib.import_module(module_name)
        finally:
            sys.path.remove(os.getcwd())
