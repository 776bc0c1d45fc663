"""Issue 24 in a real browser, on the tiny model: train (v1), continue it on the Train tab (v2),
deploy v1 as `demo` on the Registry tab, promote v2, roll back. After each change the page,
`/v1/models` and a chat completion through the real `openai` client with ``model="demo"`` follow
it without a restart, and the request log names the version that answered."""

from __future__ import annotations

import logging
import re

import pytest

from tests.helpers import open_page, screenshot, serve, tiny_run_config, wait_until, write_csv

pytestmark = [pytest.mark.browser]


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    from studio.service import Studio
    from studio.training import run_training

    root = tmp_path_factory.mktemp("browser-registry")
    studio = Studio(root / "runs")
    data = write_csv(
        root / "train.csv",
        ["instruction", "output"],
        [[f"what is {a} plus {b}", f"answer {a + b}"] for a in range(1, 9) for b in range(1, 6)],
    )
    cfg = tiny_run_config(tiny_model_dir, data, max_steps=4, memory_check=False, eval_steps=0)
    run = studio.registry.create(cfg)
    assert run_training(cfg, run).state == "finished"
    url, demo = serve(studio, model=str(tiny_model_dir))
    yield url, studio, run
    studio.stop_training()
    demo.close()


def _pick(page, dropdown: str, text: str) -> None:
    page.locator(f"#{dropdown} input").click()
    page.get_by_role("option").filter(has_text=text).first.click()


def test_continue_deploy_promote_and_roll_back(app, browser, caplog):
    from openai import OpenAI
    from playwright.sync_api import expect

    url, studio, run = app
    client = OpenAI(base_url=f"{url}/v1", api_key="unused-on-localhost", max_retries=0, timeout=60)
    page, errors = open_page(browser, url)

    # v2: continue the finished run to 8 steps on the Train tab.
    page.get_by_role("tab", name="Train").click()
    _pick(page, "resume-run", run.id)
    # Before continuing: the version it will save and the disk that takes.
    expect(page.locator("#continue-note")).to_contain_text("Continuing saves v2", timeout=30_000)
    expect(page.locator("#continue-note")).to_contain_text("keeps its latest 10 versions")
    page.locator("#continue-steps input").fill("8")
    page.locator("#resume-button").click()
    expect(page.locator("#train-status")).to_contain_text(re.compile("Continuing|Saved as v2"), timeout=30_000)
    wait_until(lambda: run.version == 2 and run.status().state == "finished", timeout=180, what="v2 saved")
    assert [v.label for v in run.versions()] == ["v1", "v2"] and run.versions()[1].parent == 1

    page.get_by_role("tab", name="Registry").click()
    deployments = page.locator("#registry-deployments")

    def deploy(version: str, why: str) -> None:
        page.locator("#registry-name input, #registry-name textarea").first.fill("demo")
        _pick(page, "registry-version", f"{run.id}@{version}")
        page.locator("#registry-why input, #registry-why textarea").first.fill(why)
        page.locator("#registry-deploy").click()
        expect(page.locator("#registry-status")).to_contain_text(f"serves {run.id}@{version}", timeout=30_000)

    def served_as(version: str) -> None:
        """The API follows at once: the model list, the model card and a real answer's log line."""
        listed = {m.id: m for m in client.models.list().data}
        assert listed["demo"].model_extra["served"] == f"{run.id}@{version}"
        card = client.models.retrieve("demo")
        assert card.model_extra["metadata"]["version"] == int(version[1:])
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="studio.serving"):
            reply = client.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "what is 2 plus 3"}], max_tokens=6, temperature=0
            )
        assert reply.model == "demo" and reply.choices[0].message.content is not None
        line = next(r.getMessage() for r in caplog.records if "model=demo " in r.getMessage())
        weights = run.get_version(int(version[1:])).record["weights_sha256"]
        assert f"model=demo -> {run.id}@{version} weights={weights} " in line, line

    deploy("v1", "first release")
    expect(deployments).to_contain_text(f"{run.id}@v1", timeout=30_000)
    served_as("v1")

    deploy("v2", "continued 4 more steps")
    expect(deployments).to_contain_text(f"{run.id}@v2", timeout=30_000)
    expect(page.locator("#registry-history")).to_contain_text("continued 4 more steps")
    served_as("v2")

    page.locator("#registry-why input, #registry-why textarea").first.fill("answers got worse")
    page.locator("#registry-rollback").click()
    expect(page.locator("#registry-status")).to_contain_text(f"rolled back to {run.id}@v1", timeout=30_000)
    expect(page.locator("#registry-history")).to_contain_text("answers got worse")
    served_as("v1")

    # A change made elsewhere (the CLI, another server) shows on the page without a click.
    studio.deployments.set("demo", f"{run.id}@v2", why="promoted from the command line")
    expect(deployments).to_contain_text(f"{run.id}@v2", timeout=15_000)

    _pick(page, "registry-run", run.id)
    versions = page.locator("#registry-versions")
    expect(versions).to_contain_text("continued", timeout=30_000)
    expect(versions).to_contain_text("training.max_steps 4 → 8")
    screenshot(page, "registry")
    assert not errors, errors
    page.close()
