"""A newcomer's first minute, from a cold start: a fresh `python app.py` process (nothing imported
yet), whose very first action is an upload, or a sample and Train. In-process servers (the other
browser tests) have transformers imported long before the first click, so they cannot catch
handlers racing on a cold import; these start a real server process every time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import SAMPLE, free_port, open_page

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
START_DEADLINE_S = 180  # a cold start imports torch, transformers and gradio: 10-25 s on 2 busy cores


def start_app(folder: Path, *args: str) -> tuple[str, subprocess.Popen, Path]:
    """Start `python app.py` as its own process on a free port with its own runs folder and
    Gradio temp dir; return (url, process, log file) once it answers HTTP, within the deadline."""
    port = free_port()
    env = {
        **os.environ,
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "GRADIO_TEMP_DIR": str(folder / "gradio"),
    }
    log = folder / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--runs-dir", str(folder / "runs"), *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_DEADLINE_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=5).close()
            return url, proc, log
        except OSError:
            if time.monotonic() > deadline:
                stop_app(proc)
                pytest.fail(f"app.py did not answer within {START_DEADLINE_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)


def stop_app(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture
def fresh_app(tmp_path):
    """A new server process for this test alone."""
    url, proc, log = start_app(tmp_path)
    yield url, log
    stop_app(proc)


def _shown_errors(page) -> list[str]:
    """Error toasts and components marked as failed: what a person sees as "Error"."""
    return page.locator("[data-testid=toast-body], .error").all_inner_texts()


def _plan_after_data(page) -> None:
    """The Train tab's memory plan ran for the uploaded data: the second handler the upload
    fires (it reads the model's config while the first loads its tokenizer)."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#memory-plan tr.fs-plan-row")).to_have_count(3, timeout=60_000)
    expect(page.locator("#memory-plan")).to_contain_text("your data's longest row", timeout=60_000)


@pytest.mark.process
@pytest.mark.parametrize("attempt", [1, 2, 3])  # the race lost 3 of 3 cold starts before the fix
def test_first_action_upload_shows_the_report(fresh_app, browser, attempt):
    from playwright.sync_api import expect

    url, log = fresh_app
    page, errors = open_page(browser, url)
    page.set_input_files("#data-upload input[type=file]", str(SAMPLE))
    report = page.locator("#data-report")
    expect(report).to_contain_text("300 usable", timeout=60_000)
    expect(report).not_to_contain_text("Can't use")
    _plan_after_data(page)
    assert not _shown_errors(page), (_shown_errors(page), log.read_text()[-3000:])
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    assert not errors, errors
    page.close()


@pytest.mark.process
def test_first_action_sample_then_train_starts_a_run(fresh_app, browser, tiny_model_dir):
    """What a newcomer does without a file of their own: pick a sample, click Train, see the run
    going and a loss point, then stop it.

    The model box names the tiny test model, and max steps is raised so the run is still going at
    Stop: the bundled default needed 4.5 minutes here for a base evaluation, a memory check, two
    steps and Stop's final evaluation on 2 busy cores (test_browser.py trains it); the imports a
    cold Train click needs are the same for both."""
    from playwright.sync_api import expect

    url, log = fresh_app
    page, errors = open_page(browser, url)
    page.get_by_role("tab", name="Train").click()
    page.locator("#model-name textarea").fill(str(tiny_model_dir))
    page.locator("#model-name textarea").press("Tab")
    page.get_by_role("tab", name="Data").click()
    page.locator("#data-sample-instructions").click()
    expect(page.locator("#data-report")).to_contain_text("usable", timeout=60_000)
    _plan_after_data(page)
    page.locator("#train-max-steps input").fill("3000")  # long enough to still be running at Stop
    page.locator("#train-max-steps input").press("Tab")
    page.locator("#train-button").click()
    status = page.locator("#train-status")
    expect(status).to_contain_text("Running", timeout=120_000)
    page.wait_for_function(
        """() => { const el = document.querySelector('#loss-plot .js-plotly-plot');
        return el && el.data && el.data[0] && el.data[0].x.length >= 1; }""",
        timeout=120_000,
    )
    expect(page.locator("#stop-button")).to_be_enabled(timeout=30_000)
    page.locator("#stop-button").click()
    expect(status).to_contain_text("Stopped at step", timeout=120_000)
    assert not _shown_errors(page), (_shown_errors(page), log.read_text()[-3000:])
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    assert not errors, errors
    page.close()


@pytest.mark.process
def test_unknown_model_is_named_and_the_upload_kept(fresh_app, browser):
    """A newcomer who first types a model that does not exist, then uploads: both tabs name the
    model (not the file), and putting the default back brings the report without a new upload."""
    from playwright.sync_api import expect

    url, log = fresh_app
    page, errors = open_page(browser, url)
    page.get_by_role("tab", name="Train").click()
    box = page.locator("#model-name textarea")
    box.fill("nosuch/model")
    box.press("Tab")
    offline = "'nosuch/model' is not in the local Hugging Face cache and the hub cannot be reached"
    expect(page.locator("#memory-plan")).to_contain_text(offline, timeout=60_000)
    page.get_by_role("tab", name="Data").click()
    page.set_input_files("#data-upload input[type=file]", str(SAMPLE))
    report = page.locator("#data-report")
    expect(report).to_contain_text("Can't count tokens: the model cannot be loaded", timeout=60_000)
    expect(report).to_contain_text(offline)
    expect(report).not_to_contain_text("Can't use this file")
    page.get_by_role("tab", name="Train").click()
    box.fill("default")
    box.press("Tab")
    page.get_by_role("tab", name="Data").click()
    expect(report).to_contain_text("300 usable", timeout=60_000)
    assert not _shown_errors(page), (_shown_errors(page), log.read_text()[-3000:])
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    assert not errors, errors
    page.close()


@pytest.mark.process
def test_the_page_server_also_serves_the_api(fresh_app):
    """`python app.py` answers the OpenAI-compatible API on its own port (studio/serving)."""
    url, log = fresh_app
    with urllib.request.urlopen(url.rstrip("/") + "/v1/models", timeout=60) as resp:
        models = json.load(resp)
    assert models["object"] == "list" and models["data"][0]["id"] == "default", models
    assert "OpenAI-compatible API on http://127.0.0.1" in log.read_text()


@pytest.mark.process
def test_upload_train_then_evaluate_with_intervals_drill_down_reload_and_comparison(fresh_app, browser, tiny_model_dir):
    """Issue 23's journey on a cold server: upload the instructions sample, train (the tiny model,
    to keep it short), Evaluate: the picked format metric with intervals and win/tie/loss, the
    drill-down filtered to "adapter worse", the sentence about outside the task; a reload keeps
    the scores; a second run scored on the same rows appears beside the first."""
    from playwright.sync_api import expect

    from studio.cli import main
    from studio.evaluation import stored
    from studio.runs.registry import RunRegistry
    from studio.training import run_training

    url, log = fresh_app
    runs = RunRegistry(log.parent / "runs")
    page, errors = open_page(browser, url)
    page.get_by_role("tab", name="Train").click()
    page.locator("#model-name textarea").fill(str(tiny_model_dir))
    page.locator("#model-name textarea").press("Tab")
    page.get_by_role("tab", name="Data").click()
    page.set_input_files("#data-upload input[type=file]", str(SAMPLE))
    expect(page.locator("#data-report")).to_contain_text("300 usable", timeout=60_000)
    _plan_after_data(page)
    page.locator("#train-max-steps input").fill("12")
    page.locator("#train-max-steps input").press("Tab")
    page.locator("#train-button").click()
    expect(page.locator("#train-status")).to_contain_text("Finished", timeout=240_000)
    (first,) = runs.list()

    page.get_by_role("tab", name="Evaluate").click()
    page.locator("#eval-run input").click()
    page.get_by_role("option").filter(has_text=f"{first.id} v1").click()
    expect(page.locator("#eval-summary")).to_contain_text("has not been evaluated yet", timeout=30_000)
    page.locator("#eval-rows input[type=number]").fill("10")
    page.locator("#eval-rows input[type=number]").press("Tab")
    page.locator("#eval-general input[type=number]").fill("10")
    page.locator("#eval-general input[type=number]").press("Tab")
    page.locator("#eval-start").click()
    summary, scores = page.locator("#eval-summary"), page.locator("#eval-scores")
    expect(summary).to_contain_text("Your answers share a format", timeout=240_000)
    result = stored.evaluations(first)[0]
    assert [m["name"] for m in result["metrics"]][0] == "regex"  # the format, picked from the references
    primary = result["metrics"][0]
    expect(scores).to_contain_text(f"{primary['adapter_ci95'][0]:.3f} to {primary['adapter_ci95'][1]:.3f}")
    expect(scores).to_contain_text(f"{primary['wins']} / {primary['ties']} / {primary['losses']}")
    expect(summary).to_contain_text(result["verdicts"][0])
    expect(summary).to_contain_text("Outside your task")
    grid = page.locator("#eval-table-rows [role=grid]")  # a virtual table: its rows are counted, not drawn
    expect(grid).to_have_attribute("aria-rowcount", str(result["rows"] + 1), timeout=30_000)  # and the header

    page.locator("#eval-filter input").click()
    page.get_by_role("option", name=stored.ADAPTER_WORSE, exact=True).click()
    expect(grid).to_have_attribute("aria-rowcount", str(primary["losses"] + 1), timeout=30_000)

    # A second run on the same data and split, scored from the command line on the same rows.
    second = runs.create(first.config().with_overrides({"training.learning_rate": 1e-3}))
    assert run_training(second.config(), second).state == "finished"
    assert main(["eval", second.id, "--runs-dir", str(runs.root), "--rows", "10", "--regression-prompts", "0"]) == 0

    page.reload()
    page.get_by_role("tab", name="Evaluate").click()
    page.locator("#eval-run input").click()
    page.get_by_role("option").filter(has_text=f"{first.id} v1").click()
    expect(page.locator("#eval-summary")).to_contain_text(result["verdicts"][0], timeout=30_000)
    compare = page.locator("#eval-compare")
    expect(compare).to_contain_text(first.id, timeout=30_000)
    expect(compare).to_contain_text(second.id)
    assert not _shown_errors(page), (_shown_errors(page), log.read_text()[-3000:])
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    assert not errors, errors
    page.close()
