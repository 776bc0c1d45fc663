"""The optional LLM judge (studio/evaluation/judge.py, judge_client.py): verdict parsing, the two
orders combined, the win rate's interval, settings checked, every way a judge fails as a sentence
(a scripted judge on a local socket), and `finetune-studio eval --judge-url` with the studio's own
server as the judge: the scores stored whatever the judge does, the key never stored."""

from __future__ import annotations

import collections
import json
import re
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from studio.evaluation import judge_client
from studio.evaluation.judge import (
    JudgeError,
    JudgeSettings,
    combine,
    describe,
    judge_against_reference,
    judge_evaluation,
    judge_pairwise,
    parse_verdict,
)
from studio.evaluation.stats import bootstrap_ci
from studio.evaluation.stored import EXAMPLES_SUFFIX
from tests.helpers import free_port, wait_until

KEY = "judge-secret-0123456789abcdef"
PAIR = ("A", "B", "TIE")


# ---- a scripted judge on a local socket ------------------------------------------------------
class FakeJudge:
    """An OpenAI-shaped /v1/chat/completions on 127.0.0.1: ``reply(body) -> (status, text)``
    decides each answer; status "hang" waits until the test ends."""

    def __init__(self, reply):
        self.reply, self.requests, self.release = reply, [], threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, text = fake.reply(body)
                if status == "hang":
                    fake.release.wait(10)
                    return
                if status == 200 and not text.startswith(("<", "{")):  # scripted reply text -> OpenAI's shape
                    text = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]})
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_judge():
    judges = []

    def start(reply):
        judges.append(FakeJudge(reply))
        return judges[-1]

    yield start
    for j in judges:
        j.close()


@pytest.fixture(autouse=True)
def _no_retry_wait(monkeypatch):
    monkeypatch.setattr(judge_client, "RETRY_WAIT_S", 0.0)
    monkeypatch.delenv(judge_client.KEY_ENV, raising=False)


def _answers(text: str) -> tuple[str, str]:
    """(answer A, answer B) out of a pairwise prompt."""
    a = re.search(r"\[Answer A\]\n(.*?)\n\n\[Answer B\]", text, re.S).group(1)
    b = re.search(r"\[Answer B\]\n(.*?)\n\nWhich", text, re.S).group(1)
    return a, b


def _user(body) -> str:
    return body["messages"][-1]["content"]


ROWS = dict(prompts=["q1", "q2", "q3", "q4"], references=["r1", "r2", "r3", "r4"])


# ---- verdicts and orders ---------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize(
    "reply, allowed, want",
    [
        ("A is closer to the reference.\nVERDICT: A", PAIR, "A"),
        ("Both fine.\n**Verdict:** [[B]]", PAIR, "B"),
        ("verdict - tie.", PAIR, "TIE"),
        ("VERDICT: A\nOn reflection B is right.\nVERDICT: B", PAIR, "B"),  # the last verdict line counts
        ("VERDICT: answer B", PAIR, "B"),
        ("VERDICT: Absolutely the first one", PAIR, None),
        ("A is better.", PAIR, None),
        ("", PAIR, None),
        ("VERDICT: CORRECT", PAIR, None),  # not a pairwise choice
        ("It matches.\nVERDICT: CORRECT", ("CORRECT", "INCORRECT"), "CORRECT"),
        ("Wrong number.\nVERDICT: incorrect", ("CORRECT", "INCORRECT"), "INCORRECT"),
    ],
)
def test_parse_verdict(reply, allowed, want):
    assert parse_verdict(reply, allowed) == want


@pytest.mark.unit
def test_the_two_orders_combine_so_position_bias_cancels():
    # base_first: the verdict with A = base; adapter_first: with A = adapter.
    assert combine("B", "A") == "win"  # both orders prefer the adapter
    assert combine("A", "B") == "loss"  # both prefer the base
    assert combine("A", "A") == "tie"  # always the first answer: position bias, not preference
    assert combine("B", "B") == "tie"
    assert combine("TIE", "A") == "tie" and combine("B", "TIE") == "tie"
    assert combine(None, "A") == "no verdict" and combine("B", None) == "no verdict"


@pytest.mark.unit
def test_win_rate_and_its_interval(fake_judge):
    # A judge that prefers the answer saying "good", wherever it stands, and for a row where
    # neither does, always picks A (a position-biased judge): those rows must come out ties.
    def reply(body):
        a, b = _answers(_user(body))
        return 200, "reason\nVERDICT: " + ("A" if "good" in a else "B" if "good" in b else "A")

    judge = fake_judge(reply)
    settings = JudgeSettings(judge.url, "judge-model", key=KEY)
    base = ["good", "meh", "meh", "meh"]
    adapter = ["meh", "good", "good", "meh"]
    out = judge_pairwise(settings, ROWS["prompts"], ROWS["references"], base, adapter)
    assert [r["outcome"] for r in out["per_row"]] == ["loss", "win", "win", "tie"]
    assert (out["wins"], out["ties"], out["losses"], out["no_verdict"]) == (2, 1, 1, 0)
    assert out["win_rate"] == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    assert out["win_rate_ci95"] == list(bootstrap_ci([0.0, 1.0, 1.0, 0.5]))
    assert "prefers neither side beyond chance" in out["verdict"]
    assert len(judge.requests) == 8  # each row in both orders
    row_one = [_answers(_user(r["body"])) for r in judge.requests if "[Request]\nq1\n" in _user(r["body"])]
    assert sorted(row_one) == [("good", "meh"), ("meh", "good")]  # base first, then swapped
    assert all(r["auth"] == f"Bearer {KEY}" and r["path"] == "/v1/chat/completions" for r in judge.requests)
    assert judge.requests[0]["body"]["temperature"] == 0 and judge.requests[0]["body"]["model"] == "judge-model"
    assert out["per_row"][0]["orders"][0] == {
        "order": "A=base, B=adapter",
        "verdict": "A",
        "reason": "reason\nVERDICT: A",
    }


@pytest.mark.unit
def test_rows_without_a_verdict_are_counted_not_guessed(fake_judge):
    judge = fake_judge(lambda body: (200, "I cannot decide.") if "q2" in _user(body) else (200, "VERDICT: TIE"))
    settings = JudgeSettings(judge.url, "m")
    out = judge_pairwise(settings, ROWS["prompts"], ROWS["references"], ["x"] * 4, ["y"] * 4)
    assert (out["ties"], out["no_verdict"], out["win_rate"]) == (3, 1, 0.5)
    assert out["per_row"][1]["orders"][1]["reason"] == "I cannot decide."
    assert "1 of 4 rows got no verdict" in out["verdict"]

    silent = fake_judge(lambda body: (200, "hmm"))
    out = judge_pairwise(JudgeSettings(silent.url, "m"), ["q"], ["r"], ["x"], ["y"])
    assert out["win_rate"] is None and out["no_verdict"] == 1 and "no usable verdict" in out["verdict"]


@pytest.mark.unit
def test_against_the_reference_and_one_refused_row(fake_judge):
    def reply(body):
        text = _user(body)
        if "q3" in text:
            return 400, json.dumps({"error": {"message": "prompt too long for the context"}})
        return 200, "VERDICT: CORRECT" if "[Answer]\nright" in text else "VERDICT: INCORRECT"

    judge = fake_judge(reply)
    out = judge_against_reference(JudgeSettings(judge.url, "m"), **ROWS, answers=["right", "wrong", "right", "x"])
    assert [r["score"] for r in out["per_row"]] == [1.0, 0.0, None, 0.0]
    assert out["no_verdict"] == 1 and out["score"] == pytest.approx(1 / 3)
    assert "HTTP 400: prompt too long" in out["per_row"][2]["reason"]


# ---- settings --------------------------------------------------------------------------------
@pytest.mark.unit
def test_settings_are_checked_and_never_show_the_key(monkeypatch):
    with pytest.raises(ValueError) as exc:
        JudgeSettings("localhost:11434/v1", "")
    assert "--judge-url must be an http(s) URL" in str(exc.value) and "--judge-model is required" in str(exc.value)
    with pytest.raises(ValueError, match="--judge-url"):
        JudgeSettings("ftp://example.com/v1", "m")
    with pytest.raises(ValueError, match="--judge-timeout"):
        JudgeSettings("http://x/v1", "m", timeout_s=0)

    s = JudgeSettings("https://user:pw@api.example.com/v1/chat/completions/", "m", key=KEY)
    assert s.endpoint == "https://user:pw@api.example.com/v1/chat/completions"
    assert s.shown_url == "https://api.example.com/v1"
    assert KEY not in repr(s) and KEY not in json.dumps(s.to_dict()) and "pw" not in json.dumps(s.to_dict())

    monkeypatch.setenv(judge_client.KEY_ENV, "from-env")
    assert JudgeSettings("http://x/v1", "m").key == "from-env"
    assert JudgeSettings("http://x/v1", "m", key="flag").key == "flag"  # a flag wins over the environment


# ---- a judge that fails ------------------------------------------------------------------------
def _error(settings) -> str:
    with pytest.raises(JudgeError) as exc:
        judge_pairwise(settings, ["q"], ["r"], ["a"], ["b"])
    text = str(exc.value)
    assert KEY not in text
    return text


@pytest.mark.unit
def test_every_failure_is_a_sentence_with_the_fix(fake_judge):
    echo = json.dumps({"error": {"message": f"bad key {KEY}"}})
    text = _error(JudgeSettings(fake_judge(lambda body: (401, echo)).url, "m", key=KEY))
    assert "refused the request (HTTP 401: bad key ***)" in text and "--judge-key" in text

    text = _error(JudgeSettings(fake_judge(lambda body: (404, '{"detail": "no model m"}')).url, "m", key=KEY))
    assert "HTTP 404: no model m" in text and "`m`" in text and "/v1/models" in text

    failing = fake_judge(lambda body: (500, "boom"))
    text = _error(JudgeSettings(failing.url, "m", key=KEY, workers=1))
    # One retry, no more, per request (the other order's request may have started before the
    # first one's error stopped the rest: on a busy machine it does).
    asked = collections.Counter(json.dumps(r["body"], sort_keys=True) for r in failing.requests)
    assert "HTTP 500: boom (tried twice)" in text and max(asked.values()) == 2 and len(failing.requests) <= 4

    text = _error(JudgeSettings(fake_judge(lambda body: (200, "<html>hello</html>")).url, "m", key=KEY))
    assert "not JSON ('<html>hello</html>')" in text and "/v1" in text

    text = _error(JudgeSettings(fake_judge(lambda body: (200, '{"choices": [{}]}')).url, "m"))
    assert "without a chat reply" in text

    closed = f"http://127.0.0.1:{free_port()}/v1"
    text = _error(JudgeSettings(closed, "m", key=KEY))
    assert text.startswith(f"The judge at {closed} refused the connection: is the server running")

    hanging = fake_judge(lambda body: ("hang", ""))
    started = time.perf_counter()
    text = _error(JudgeSettings(hanging.url, "m", key=KEY, timeout_s=0.5))
    assert "did not answer within 0.5 s" in text and "--judge-timeout" in text
    assert time.perf_counter() - started < 5


@pytest.mark.unit
def test_a_failing_judge_leaves_an_error_and_no_rows():
    closed = f"http://127.0.0.1:{free_port()}/v1"
    entry, rows = judge_evaluation(
        JudgeSettings(closed, "m", key=KEY), **ROWS, base_answers=["a"] * 4, adapter_answers=["b"] * 4
    )
    assert "refused the connection" in entry["error"] and rows == [None] * 4
    assert entry["url"] == closed and KEY not in json.dumps(entry)
    assert describe(entry)[-1].endswith(entry["error"])


@pytest.mark.unit
def test_stop_ends_a_judge_that_hangs_and_keeps_the_scores(fake_judge):
    """The page's Stop during judging: the judge's entry says it was stopped, within a second, and
    judge_evaluation returns (so the task scores are stored) instead of waiting out the timeout."""
    hanging = fake_judge(lambda body: ("hang", ""))
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.perf_counter()
    entry, rows = judge_evaluation(
        JudgeSettings(hanging.url, "m", timeout_s=30),
        **ROWS,
        base_answers=["a"] * 4,
        adapter_answers=["b"] * 4,
        stop=stop,
    )
    assert entry["error"] == judge_client.STOPPED and rows == [None] * 4
    assert time.perf_counter() - started < 3


@pytest.mark.unit
def test_judge_evaluation_spreads_its_rows_and_summarises_both_kinds(fake_judge):
    def reply(body):
        text = _user(body)
        if "[Answer A]" in text:
            a, b = _answers(text)
            return 200, "VERDICT: " + ("A" if a.startswith("adapter") else "B")
        return 200, "VERDICT: " + ("CORRECT" if "[Answer]\nadapter" in text else "INCORRECT")

    judge = fake_judge(reply)
    n = 10
    entry, rows = judge_evaluation(
        JudgeSettings(judge.url, "m", max_rows=4),
        [f"q{i}" for i in range(n)],
        [f"r{i}" for i in range(n)],
        [f"base {i}" for i in range(n)],
        [f"adapter {i}" for i in range(n)],
    )
    assert entry["rows"] == 4 and entry["of_rows"] == n and len(judge.requests) == 4 * 4
    assert [i for i, r in enumerate(rows) if r is not None] == [0, 2, 5, 7]
    assert entry["pairwise"]["wins"] == 4 and entry["pairwise"]["win_rate"] == 1.0
    ref = entry["reference"]
    assert (ref["base"], ref["adapter"], ref["diff"]) == (0.0, 1.0, 1.0)
    assert entry["per_row"][1]["row"] == 2 and entry["per_row"][1]["reference"]["adapter"]["verdict"] == "CORRECT"
    assert len(describe(entry)) == 4


# ---- the studio's own server as the judge --------------------------------------------------------
@pytest.fixture(scope="module")
def studio_judge(tiny_model_dir, tmp_path_factory):
    """`finetune-studio serve`'s app on a copy of the tiny model with a longer context (the
    judging prompt is about 420 of its tokens), keyed, on a free port; yields (url, base id)."""
    import uvicorn

    from studio.service import Studio
    from studio.serving.server import create_app, serving_context

    root = tmp_path_factory.mktemp("judge")
    model = Path(shutil.copytree(tiny_model_dir, root / "judge-model"))
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    ctx = serving_context(Studio(root / "runs"), model=str(model), api_key=KEY)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ctx), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 60, "the judge's API server to start")
    yield f"http://127.0.0.1:{port}/v1", ctx.catalog.base
    server.should_exit = True
    thread.join(20)


def test_eval_with_the_studios_own_server_as_judge(studio_judge, trained_tiny_run, capsys, monkeypatch):
    from studio.cli import main

    url, model = studio_judge
    run = trained_tiny_run
    monkeypatch.setenv(judge_client.KEY_ENV, KEY)  # the key from the environment, as documented
    capsys.readouterr()
    code = main(["eval", str(run.path), "--judge-url", url, "--judge-model", model, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    judge = result["judge"]
    assert "error" not in judge, judge.get("error")
    assert judge["url"] == url and judge["model"] == model and judge["rows"] == result["rows"] == 4
    pair = judge["pairwise"]
    assert pair["wins"] + pair["ties"] + pair["losses"] + pair["no_verdict"] == 4
    # The random model does not follow the format: whatever it wrote, the counts follow its replies.
    lines = [json.loads(x) for x in Path(result["examples"]).read_text(encoding="utf-8").splitlines()]
    outcomes = []
    for line in lines:
        orders = line["judge"]["pairwise"]["orders"]
        assert [o["order"] for o in orders] == ["A=base, B=adapter", "A=adapter, B=base"]
        assert all(isinstance(o["reason"], str) for o in orders)
        outcomes.append(combine(*(parse_verdict(o["reason"], PAIR) for o in orders)))
        assert set(line["judge"]["reference"]) == {"base", "adapter"}
    assert outcomes.count("no verdict") == pair["no_verdict"] and outcomes.count("win") == pair["wins"]
    assert result["metrics"] and result["verdicts"]  # the task scores are there as without a judge

    # A judge that is not there: the scores are still computed and stored, the problem is named.
    closed = f"http://127.0.0.1:{free_port()}/v1"
    code = main(["eval", str(run.path), "--judge-url", closed, "--judge-model", model, "--judge-key", KEY])
    out, err = capsys.readouterr()
    assert code == 0 and f"The judge at {closed} refused the connection" in out + err and "win/tie/loss" in out
    examples = re.search(r"their scores: (\S+)", out).group(1)
    last = json.loads(Path(examples.replace(EXAMPLES_SUFFIX, ".json")).read_text(encoding="utf-8"))
    assert "refused the connection" in last["judge"]["error"] and last["metrics"]

    # The key is sent, never stored.
    for path in (run.path / "evaluations").iterdir():
        assert KEY not in path.read_text(encoding="utf-8"), path
    assert KEY not in out + err
