"""Issue 24, served: `finetune-studio serve` and the UI server on one runs folder follow each
other's promotions (and the CLI's) within a second; a version whose base was replaced (new weights
under the same folder) is refused with both digests, marked on the Registry tab, and re-evaluated
on the new base with its last evaluation's settings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest
import torch

from studio.runs.registry import Run
from studio.training import run_training
from tests.helpers import add_version, free_port, serve, tiny_run_config, wait_until, write_csv

pytestmark = pytest.mark.process
CLI = [sys.executable, "-m", "studio.cli"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    from studio.service import Studio

    root = tmp_path_factory.mktemp("deploy")
    base = shutil.copytree(tiny_model_dir, root / "base")  # a base of our own: the test replaces its weights
    data = write_csv(
        root / "sums.csv",
        ["instruction", "output"],
        [[f"what is {a} plus {b}", f"answer {a + b}"] for a in range(1, 9) for b in range(1, 6)],
    )
    studio = Studio(root / "runs")
    cfg = tiny_run_config(base, data, max_steps=4, memory_check=False)
    run = studio.registry.create(cfg)
    assert run_training(cfg, run).state == "finished"
    add_version(run, run.weights_dir(), kind="continued")  # v2: what a continuation would save
    url, demo = serve(studio, model=str(base))
    port = free_port()
    log = root / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*CLI, "serve", "--port", str(port), "--model", str(base), "--runs-dir", str(root / "runs")],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
    other = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, log.read_text()
        try:
            return httpx.get(f"{other}/v1/models", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, 180, "`finetune-studio serve`", poll=0.2)
    yield studio, run, base, url, other, log
    proc.terminate()
    proc.wait(timeout=30)
    demo.close()


def _served(url: str) -> str | None:
    reply = httpx.get(f"{url}/v1/models/demo", timeout=10)
    return reply.json().get("served") if reply.status_code == 200 else None


def _seconds_until(url: str, ref: str, limit: float = 5.0) -> float:
    started = time.monotonic()
    wait_until(lambda: _served(url) == ref, limit, f"{url} serving demo as {ref}", poll=0.01)
    return time.monotonic() - started


def _chat(url: str, model: str = "demo") -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "what is 2 plus 3"}], "max_tokens": 4}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def test_serve_and_the_ui_server_follow_each_others_promotions_within_a_second(setup):
    studio, run, _, url, other, log = setup
    runs = str(studio.registry.root)
    done = subprocess.run(
        [*CLI, "deploy", "set", "demo", f"{run.id}@v1", "--why", "from the CLI", "--runs-dir", runs],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0 and f"demo -> {run.id}@v1" in done.stdout, done.stderr
    assert _seconds_until(url, f"{run.id}@v1") < 1.0 and _seconds_until(other, f"{run.id}@v1") < 1.0

    studio.deploy("demo", f"{run.id}@v2", why="promoted on the page")  # the UI server's own promotion
    assert _seconds_until(other, f"{run.id}@v2") < 1.0  # seen by the other process at its next request
    reply = _chat(other)
    assert reply.status_code == 200 and reply.json()["model"] == "demo", reply.text
    weights = run.get_version(2).record["weights_sha256"]
    wait_until(lambda: f"model=demo -> {run.id}@v2 weights={weights}" in log.read_text(), 30, "the log line")

    listed = httpx.get(f"{other}/v1/models", timeout=10).json()["data"]
    demo = next(m for m in listed if m["id"] == "demo")
    assert demo["served"] == f"{run.id}@v2" and demo["deployment"] == "demo"
    assert {f"{run.id}@v1", f"{run.id}@v2", run.id} <= {m["id"] for m in listed}

    back = subprocess.run(
        [*CLI, "deploy", "rollback", "demo", "--runs-dir", runs], capture_output=True, text=True, timeout=60
    )
    assert back.returncode == 0 and f"demo -> {run.id}@v1" in back.stdout, back.stderr
    assert _seconds_until(url, f"{run.id}@v1") < 1.0 and _seconds_until(other, f"{run.id}@v1") < 1.0
    history = subprocess.run(
        [*CLI, "deploy", "history", "demo", "--json", "--runs-dir", runs], capture_output=True, text=True, timeout=60
    )
    entries = json.loads(history.stdout)
    assert [(e["action"], e["to"]) for e in entries] == [
        ("set", f"{run.id}@v1"),
        ("set", f"{run.id}@v2"),
        ("rollback", f"{run.id}@v1"),
    ]
    assert entries[1]["why"] == "promoted on the page"


def test_a_replaced_base_is_refused_marked_and_re_evaluated(setup):
    from transformers import AutoModelForCausalLM

    from studio.runs import fingerprint
    from studio.ui import registry_tab
    from studio.ui.views import ANOTHER_BASE

    studio, run, base, url, _, _ = setup
    studio.deploy("demo", f"{run.id}@v2", why="before the base changed")
    first = studio.evaluate_task(f"{run.id}@v2", rows=4, regression_prompts=0, max_new_tokens=4)
    assert _chat(url).status_code == 200
    was = fingerprint.weights_digest(base)

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(base.parent / "updated")  # the same names and shapes: only the weights differ
    shutil.copyfile(base.parent / "updated" / "model.safetensors", base / "model.safetensors")
    now = fingerprint.weights_digest(base)
    assert now != was

    refused = _chat(url)
    assert refused.status_code == 400, refused.text
    message = refused.json()["error"]["message"]
    assert message.startswith(f"Deployment 'demo' ({run.id}@v2) is not served") and was[:12] in message
    assert now[:12] in message and "--on-changed-base" in message
    assert _chat(url, f"{run.id}@v1").status_code == 400  # every version trained on the old base
    frame = registry_tab.deployments_frame(studio)
    assert frame.loc[frame["deployment"] == "demo", "note"].item().startswith(ANOTHER_BASE)
    assert registry_tab.versions_frame(studio, run.id)["note"].tolist() == [ANOTHER_BASE, ANOTHER_BASE]

    result = studio.reevaluate(f"{run.id}@v2")
    assert result["on_changed_base"] and result["base_weights"] == now and result["version"] == 2
    assert result["rows"] == first["rows"] == 4 and result["max_new_tokens"] == 4
    assert result["settings"]["metrics"] == first["settings"]["metrics"]
    brief = Run(run.path).get_version(2).scores()[0]
    assert brief["on_changed_base"] and brief["evaluation"] == os.path.basename(result["path"])
    assert _chat(url).status_code == 400  # still refused: a re-evaluation is not a promotion
