import json
import os

import pytest

from studio.config import RunConfig
from studio.runs.records import EvalRecord, TrainRecord
from studio.runs.registry import RunRegistry

pytestmark = pytest.mark.unit


def test_create_list_get_and_status(runs_dir):
    reg = RunRegistry(runs_dir)
    cfg = RunConfig.from_dict({"data": {"path": "/x/my data.csv"}})
    a, b = reg.create(cfg), reg.create(cfg)
    assert a.id != b.id and "my-data" in a.id
    assert a.status().state == "queued"
    assert a.config() == cfg
    assert {r.id for r in reg.list()} == {a.id, b.id}
    assert reg.get(a.id).path == a.path and reg.get(str(a.path)).path == a.path
    with pytest.raises(LookupError, match="No run called"):
        reg.get("nope")
    a.set_status("running", step=3)
    assert a.status().step == 3 and a.status().state == "running"
    assert not any(p.name.endswith(".tmp") for p in a.path.iterdir())
    assert reg.trained() == []  # nothing saved yet


def test_metrics_survive_a_cut_last_line(runs_dir):
    run = RunRegistry(runs_dir).create(RunConfig())
    run.append_metrics(TrainRecord(step=1, loss=2.0))
    with run.metrics_path.open("a") as f:
        f.write('{"kind": "train", "st')  # a crash mid-write
    assert run.metrics() == [TrainRecord(step=1, loss=2.0)]


def test_orphaned_running_runs_become_interrupted(runs_dir):
    reg = RunRegistry(runs_dir)
    run = reg.create(RunConfig())
    run.set_status("running", pid=2**22 + 12345)  # no such process
    alive = reg.create(RunConfig())
    alive.set_status("running", pid=os.getpid())
    waiting = reg.create(RunConfig())  # queued when the server stopped: never started
    reg.mark_orphans_interrupted()
    assert run.status().state == "interrupted"
    assert waiting.status().state == "interrupted" and "never started" in waiting.status().message
    assert alive.status().state == "running"
    assert json.loads((run.path / "status.json").read_text())["state"] == "interrupted"


def test_past_runs_table_and_config_diff(runs_dir, tmp_path):
    from studio.runs.registry import config_diff
    from studio.service import Studio
    from studio.ui.views import runs_frame

    data = tmp_path / "d.csv"
    data.write_text("instruction,output\na,b\n", encoding="utf-8")
    registry = RunRegistry(runs_dir)
    a = registry.create(RunConfig.from_dict({"data": {"path": str(data)}, "training": {"learning_rate": 1e-4}}))
    b = registry.create(
        RunConfig.from_dict({"data": {"path": str(data)}, "method": "qlora", "training": {"learning_rate": 3e-4}})
    )
    a.set_status("finished", started_at=100.0, finished_at=160.0, step=10, total_steps=10, final_loss=0.5)
    assert config_diff(a, b) == [("method", "lora", "qlora"), ("training.learning_rate", 1e-4, 3e-4)]
    assert config_diff(a, a) == []
    studio = Studio(runs_dir)
    table = runs_frame(studio)
    assert list(table["run"]) == [b.id, a.id]  # newest first
    row = table[table["run"] == a.id].iloc[0]
    assert row["state"] == "finished" and row["steps"] == "10/10" and row["duration s"] == 60
    a.append_metrics(TrainRecord(step=1, loss=1.0))
    a.append_metrics(EvalRecord(step=1, eval_loss=1.1))
    train, evals = studio.curves([a.id])[a.id]
    assert [m.loss for m in train] == [1.0] and [m.eval_loss for m in evals] == [1.1]


def test_rename_validates_and_keeps_the_id(runs_dir):
    reg = RunRegistry(runs_dir)
    run = reg.create(RunConfig())
    assert run.name == run.id and run.version == 0
    assert run.rename("  my   best\tadapter ") == "my best adapter"
    assert reg.get(run.id).name == "my best adapter" and run.status().state == "queued"
    for bad, match in (("", "cannot be empty"), ("x" * 81, "at most 80"), ("a\x00b", "control characters")):
        with pytest.raises(ValueError, match=match):
            run.rename(bad)
    assert run.name == "my best adapter"  # a refused rename changes nothing


def test_delete_refuses_a_live_run_and_removes_a_finished_one(runs_dir, tmp_path):
    from studio.service import Studio

    reg = RunRegistry(runs_dir)
    live, done = reg.create(RunConfig()), reg.create(RunConfig())
    live.set_status("running", pid=os.getpid())
    done.set_status("finished")
    (done.path / "adapter").mkdir()
    with pytest.raises(ValueError, match="stop it before deleting"):
        reg.delete(live.id)
    outside = tmp_path / "elsewhere" / "run"
    outside.mkdir(parents=True)
    (outside / "status.json").write_text('{"state": "finished"}')
    with pytest.raises(ValueError, match="not inside the runs folder"):
        reg.delete(str(outside))  # a path to a run folder elsewhere is never removed
    assert outside.exists()
    assert Studio(runs_dir).delete_run(done.id) == done.id
    assert not done.path.exists() and [r.id for r in reg.list()] == [live.id]
    assert not any(p.name.startswith(".deleting") for p in runs_dir.iterdir())
    with pytest.raises(LookupError):
        reg.delete(done.id)
