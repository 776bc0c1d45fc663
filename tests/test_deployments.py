"""Issue 24: kept versions and named deployments on a runs folder, without a model.

Versions here are folders a save would write (a fake adapter's files); what they hold is not
read. The processes that promote at once, and the one killed mid-promotion, are real processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from studio.config import RunConfig
from studio.runs import versions
from studio.runs.deployments import DeploymentError, Deployments
from studio.runs.registry import Run, RunRegistry

ROOT = Path(__file__).resolve().parents[1]


def _save_version(run: Run, payload: bytes = b"weights", kind: str = "trained") -> versions.Version:
    number, folder = run.next_version_dir()
    tmp = folder.with_name(f".{folder.name}.tmp")
    tmp.mkdir(parents=True)
    (tmp / "adapter_config.json").write_text("{}")
    (tmp / "adapter_model.safetensors").write_bytes(payload)
    tmp.rename(folder)
    return run.commit_version(number, kind)


def _run(registry: RunRegistry, method: str = "lora", versions_: int = 1, data: str = "faq.csv") -> Run:
    run = registry.create(RunConfig(method=method).with_overrides({"data.path": data}))
    run.set_status("finished", step=10, data_sha256="ab" * 8, train_rows=40, eval_rows=5, started_at=time.time() - 3)
    for i in range(versions_):
        _save_version(run, f"w{i}".encode())
    return run


@pytest.fixture
def registry(tmp_path):
    return RunRegistry(tmp_path / "runs")


@pytest.mark.unit
def test_each_final_save_is_a_kept_version_with_its_lineage(registry):
    run = _run(registry, versions_=2)
    kept = run.versions()
    assert [v.label for v in kept] == ["v1", "v2"] and run.version == 2 and run.weights_dir() == kept[1].path
    assert kept[1].parent == 1 and kept[0].parent is None
    record = kept[1].record
    assert record["data"] == {
        "file": "faq.csv",
        "eval_file": None,
        "sha256": "ab" * 8,
        "train_rows": 40,
        "eval_rows": 5,
    }
    assert record["config"]["method"] == "lora" and record["weights_sha256"] and record["disk_bytes"] > 0
    assert record["train_seconds"] >= 3
    assert run.weights_at("v1") == kept[0].path and run.weights_at() == kept[1].path
    with pytest.raises(ValueError, match=r"no version v7 \(it has: v1, v2\)"):
        run.weights_at("v7")
    assert (kept[0].path / "adapter_model.safetensors").read_bytes() == b"w0"  # v2 never touched v1


@pytest.mark.unit
def test_a_save_cut_short_is_no_version_and_its_number_is_taken_again(registry):
    run = _run(registry)
    number, folder = run.next_version_dir()
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")  # weights renamed in, killed before version.json
    assert [v.label for v in run.versions()] == ["v1"] and run.next_version_dir()[0] == number == 2


@pytest.mark.unit
def test_a_run_from_before_versions_reads_as_v1_and_continues_to_v2(registry):
    run = _run(registry, versions_=0)
    legacy = run.path / "adapter"
    legacy.mkdir()
    (legacy / "adapter_config.json").write_text("{}")
    (legacy / "adapter_model.safetensors").write_bytes(b"old")
    (run.path / "fingerprint.json").write_text(json.dumps({"model": "default", "hidden_size": 8}))
    [v1] = run.versions()
    assert v1.legacy and v1.path == legacy and run.weights_dir() == legacy and run.version == 1
    assert v1.record["data"]["sha256"] == "ab" * 8 and v1.record["base_fingerprint"]["hidden_size"] == 8
    v2 = _save_version(run, b"new", kind="continued")
    assert v2.number == 2 and v2.parent == 1 and run.weights_at("v1") == legacy
    assert versions.public(v2)["base"]["fingerprint"]["hidden_size"] == 8


@pytest.mark.unit
def test_delete_and_keep_last_n_never_touch_the_latest_or_a_deployed_version(registry):
    run = _run(registry, versions_=4)
    deployments = Deployments(registry)
    deployments.set("demo", f"{run.id}@v1")
    with pytest.raises(ValueError, match="deployed as demo"):
        run.delete_version(1, deployments.holding(run.id, 1))
    with pytest.raises(ValueError, match="latest version"):
        run.delete_version(4)
    assert run.delete_version(2).number == 2
    assert run.prune_versions(1, deployments.held_versions(run.id)) == [3]  # v1 is deployed: kept over the count
    assert [v.label for v in run.versions()] == ["v1", "v4"]
    assert _save_version(run).number == 5  # numbers are never reused: a logged ref means one artifact
    assert not list(run.path.glob("versions/.deleting-*"))


@pytest.mark.unit
def test_set_rollback_and_history(registry):
    run = _run(registry, versions_=3)
    d = Deployments(registry)
    d.set("support-bot", f"{run.id}@v1", why="first")
    d.set("support-bot", run.id, why="latest")  # a run id: recorded as the number it is now
    assert d.get("support-bot").ref == f"{run.id}@v3"
    d.set("support-bot", f"{run.id}@v2")
    assert d.rollback("support-bot", why="complaints").ref == f"{run.id}@v3"
    assert d.rollback("support-bot").ref == f"{run.id}@v1"  # two steps back, not back and forth
    with pytest.raises(DeploymentError, match="nothing to roll back to"):
        d.rollback("support-bot")
    history = d.get("support-bot").history
    assert [(e["action"], e["from"], e["to"]) for e in history] == [
        ("set", None, f"{run.id}@v1"),
        ("set", f"{run.id}@v1", f"{run.id}@v3"),
        ("set", f"{run.id}@v3", f"{run.id}@v2"),
        ("rollback", f"{run.id}@v2", f"{run.id}@v3"),
        ("rollback", f"{run.id}@v3", f"{run.id}@v1"),
    ]
    assert history[0]["why"] == "first" and history[3]["why"] == "complaints"
    assert [x.name for x in d.list()] == ["support-bot"]


@pytest.mark.unit
@pytest.mark.parametrize(
    "name, ref, message",
    [
        ("default", "RUN@v1", "already means the base model"),
        ("RUN", "RUN@v1", "is a run id"),
        ("../etc", "RUN@v1", "cannot be a deployment name"),
        ("demo", "RUN@step-4", "is a checkpoint, not a version"),
        ("demo", "RUN@v9", "no version v9"),
        ("demo", "nope", "No run called 'nope'"),
        ("demo", "FULL", "full fine-tune"),
        ("some-org/base", "RUN", "cannot be a deployment name"),
    ],
)
def test_bad_deployments_are_refused_with_a_sentence(registry, name, ref, message):
    run, full = _run(registry), _run(registry, method="full", data="other.csv")
    ref = ref.replace("RUN", run.id).replace("FULL", full.id)
    with pytest.raises(DeploymentError, match=message):
        Deployments(registry).set(name.replace("RUN", run.id), ref)
    assert not (registry.root / "deployments").exists() or not list((registry.root / "deployments").glob("*.json"))


@pytest.mark.unit
def test_a_base_model_id_is_not_a_deployment_name(registry):
    run = _run(registry)
    run.set_status("finished", model="my-base")
    with pytest.raises(DeploymentError, match="base model's id"):
        Deployments(registry).set("my-base", run.id)


_PROMOTER = """
import sys, time
from studio.runs.deployments import Deployments
from studio.runs.registry import RunRegistry
d = Deployments(RunRegistry(sys.argv[1]))
refs, n = sys.argv[3].split(","), int(sys.argv[4])
print("ready", flush=True)
while time.time() < float(sys.argv[5]):
    time.sleep(0.001)
for i in range(n):
    d.set(sys.argv[2], refs[i % len(refs)], why=f"{sys.argv[6]} {i}")
"""


def _promoter(registry, name, refs, n, start, tag):
    return subprocess.Popen(
        [sys.executable, "-c", _PROMOTER, str(registry.root), name, ",".join(refs), str(n), str(start), tag],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.mark.process
def test_two_processes_promoting_at_once_both_land_in_the_history(registry):
    a, b = _run(registry, versions_=2), _run(registry, versions_=2, data="b.csv")
    d = Deployments(registry)
    d.set("demo", f"{a.id}@v1")
    start = time.time() + 3  # both start together, after their imports
    procs = [
        _promoter(registry, "demo", [f"{a.id}@v2", f"{a.id}@v1"], 25, start, "first"),
        _promoter(registry, "demo", [f"{b.id}@v1", f"{b.id}@v2"], 25, start, "second"),
    ]
    for p in procs:
        assert p.wait(timeout=60) == 0
    final = d.get("demo")
    assert len(final.history) == 51
    assert sum(e["why"].startswith("first") for e in final.history) == 25
    assert sum(e["why"].startswith("second") for e in final.history) == 25
    assert final.history[-1]["to"] == final.ref  # the last entry names what the pointer holds
    for before, after in zip(final.history, final.history[1:]):  # no change was lost between them
        assert after["from"] == before["to"]


@pytest.mark.process
def test_a_kill_9_mid_promotion_leaves_the_old_or_the_new_pointer(registry):
    run = _run(registry, versions_=3)
    d = Deployments(registry)
    d.set("demo", f"{run.id}@v1")
    refs = [f"{run.id}@v{n}" for n in (1, 2, 3)]
    for delay in (0.05, 0.11, 0.23, 0.37):
        proc = _promoter(registry, "demo", refs, 100000, time.time(), "loop")
        proc.stdout.readline()  # imported: promoting from now on
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        now = d.get("demo")
        assert now is not None and now.ref in refs, "the pointer file is whole"
        assert now.history[-1]["to"] == now.ref
        d.set("demo", refs[0], why="after the kill")  # the lock died with the process: the next change goes through
        assert d.get("demo").history[-1]["why"] == "after the kill"


@pytest.mark.unit
def test_the_versions_and_deploy_commands(registry, capsys):
    from studio.cli import main

    run = _run(registry, versions_=3)
    runs = ["--runs-dir", str(registry.root)]
    assert main(["deploy", "list", *runs]) == 0
    assert "No deployments yet" in capsys.readouterr().out
    assert main(["deploy", "set", "demo", f"{run.id}@v2", "--why", "ok", *runs]) == 0
    assert capsys.readouterr().out.strip() == f"demo -> {run.id}@v2"
    assert main(["deploy", "set", "demo", run.id, *runs]) == 0
    assert capsys.readouterr().out.strip() == f"demo -> {run.id}@v3 (was {run.id}@v2)"
    assert main(["deploy", "set", "default", run.id, *runs]) == 1
    assert "already means the base model" in capsys.readouterr().err
    assert main(["deploy", "list", "--json", *runs]) == 0
    assert [(d["name"], d["ref"]) for d in json.loads(capsys.readouterr().out)] == [("demo", f"{run.id}@v3")]
    assert main(["deploy", "rollback", "demo", *runs]) == 0
    assert capsys.readouterr().out.strip() == f"demo -> {run.id}@v2 (rolled back from {run.id}@v3)"
    assert main(["deploy", "history", "nope", *runs]) == 1
    assert "no deployment called 'nope'" in capsys.readouterr().err

    assert main(["versions", run.id, *runs]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()[1:] if line.startswith("v")] == ["v1", "v2", "v3"]
    assert "demo" in next(line for line in out.splitlines() if line.startswith("v2"))
    assert main(["versions", run.id, "--delete", "v2", *runs]) == 1
    assert "deployed as demo" in capsys.readouterr().err
    assert main(["versions", run.id, "--delete", "1", *runs]) == 0
    assert capsys.readouterr().out.startswith(f"Deleted {run.id}@v1 (")
    assert main(["versions", run.id, "--json", *runs]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["version"] for r in rows] == ["v2", "v3"] and rows[0]["deployed_as"] == ["demo"]
    assert rows[1]["parent"] == "v2" and rows[0]["disk_bytes"] > 0
