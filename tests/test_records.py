"""The typed run record: what is on disk keeps its shape, and readers get types."""

import json

import pytest

from studio.config import RunConfig
from studio.runs.records import EvalRecord, Event, Retry, RunStatus, TrainRecord, parse_record
from studio.runs.registry import RunRegistry

pytestmark = pytest.mark.unit


def test_records_round_trip_with_keys_they_do_not_know():
    line = {"kind": "train", "step": 3, "loss": 1.5, "tokens": 40, "rss_mib": 812.0, "added_later": [1, 2]}
    record = parse_record(line)
    assert isinstance(record, TrainRecord) and record.step == 3 and record.loss == 1.5
    assert record.extra == {"rss_mib": 812.0, "added_later": [1, 2]}  # kept, and written back
    assert {k: v for k, v in record.to_dict().items() if k in line} == line
    ev = parse_record({"kind": "eval", "step": 0, "eval_loss": 2.25, "time": 1.0})
    assert ev == EvalRecord(step=0, eval_loss=2.25, time=1.0) and ev.to_dict()["kind"] == "eval"
    event = parse_record({"kind": "checkpoint", "step": 4, "time": 2.0})
    assert event == Event("checkpoint", 4, 2.0) and event.to_dict() == {"kind": "checkpoint", "step": 4, "time": 2.0}


@pytest.mark.parametrize(
    "line",
    [
        {"kind": "train", "step": 1, "loss": float("nan")},  # drawn as nothing, not as a gap
        {"kind": "train", "step": 1},
        {"kind": "eval", "step": 1, "eval_loss": "low"},
        {"kind": "train", "step": "one", "loss": 1.0},
        {"step": 1, "loss": 1.0},
        ["not", "an", "object"],
    ],
)
def test_lines_that_are_not_usable_records_are_skipped(line):
    assert parse_record(line) is None


def test_status_reads_old_files_and_keeps_unknown_keys(runs_dir):
    run = RunRegistry(runs_dir).create(RunConfig())
    old = {"state": "finished", "bf16": True, "final_loss": 0.5, "from_a_newer_studio": {"x": 1}, "retry": None}
    (run.path / "status.json").write_text(json.dumps(old))
    status = run.status()
    assert status.state == "finished" and status.bf16 is True and status.precision is None
    assert status.retry is None and status.extra == {"from_a_newer_studio": {"x": 1}}
    run.set_status("finished", name="kept")
    on_disk = json.loads((run.path / "status.json").read_text())
    assert on_disk["from_a_newer_studio"] == {"x": 1} and on_disk["name"] == "kept" and on_disk["bf16"] is True


def test_set_status_refuses_a_field_nobody_reads(runs_dir):
    run = RunRegistry(runs_dir).create(RunConfig())
    with pytest.raises(TypeError, match="final_los"):
        run.set_status("running", final_los=1.0)


def test_retry_survives_the_file_as_the_same_object(runs_dir):
    run = RunRegistry(runs_dir).create(RunConfig())
    retry = Retry("Lower the batch size to 2.", "lora", {"training.batch_size": 2})
    run.set_status("failed", retry=retry)
    assert run.status().retry == retry
    assert json.loads((run.path / "status.json").read_text())["retry"] == retry.to_dict()
    assert RunStatus.from_dict({"retry": {"text": "x"}}).retry is None  # no changes: nothing to apply


def test_train_and_eval_metrics_are_typed(runs_dir):
    run = RunRegistry(runs_dir).create(RunConfig())
    run.append_metrics(TrainRecord(step=1, loss=2.0, extra={"rss_mib": 10.0}))
    run.append_metrics(EvalRecord(step=1, eval_loss=2.5))
    run.append_metrics(Event("checkpoint", 1))
    assert [m.loss for m in run.train_metrics()] == [2.0] and run.train_metrics()[0].extra == {"rss_mib": 10.0}
    assert [m.eval_loss for m in run.eval_metrics()] == [2.5]
    assert [type(m) for m in run.metrics()] == [TrainRecord, EvalRecord, Event]
    run.truncate_metrics(0)
    assert run.metrics() == []
