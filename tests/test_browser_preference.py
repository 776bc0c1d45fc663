"""Issue 25 in a real browser with the real default model: upload the bundled preference sample,
see it detected and validated with both sides shown, train DPO with LoRA while reward accuracy
streams, compare base and adapter in chat, evaluate (held-out preference accuracy up), and load
the downloaded adapter zip in plain PEFT."""

from __future__ import annotations

import importlib.resources
import zipfile

import pytest

from tests.helpers import open_page, screenshot, serve

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SAMPLE = importlib.resources.files("studio") / "templates" / "samples" / "preferences.csv"
STEPS = 24


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from studio.service import Studio

    studio = Studio(tmp_path_factory.mktemp("browser-preference"))
    url, demo = serve(studio)
    yield url, studio
    studio.stop_training()
    demo.close()


def _reward_points(page, name: str) -> list[float]:
    return page.evaluate(f"""() => {{
        const el = document.querySelector('#loss-plot .js-plotly-plot');
        const t = el && el.data ? el.data.find(d => d.name === '{name}') : null;
        return t ? Array.from(t.y) : []; }}""")


def test_upload_train_dpo_chat_evaluate_export(app, browser, tmp_path):
    from peft import PeftModel
    from playwright.sync_api import expect
    from transformers import AutoModelForCausalLM

    from studio import models

    url, studio = app
    page, errors = open_page(browser, url)
    page.set_input_files("#data-upload input[type=file]", str(SAMPLE))
    report = page.locator("#data-report")
    expect(report).to_contain_text("preference pairs: prompt, chosen, rejected", timeout=60_000)
    expect(report).to_contain_text("300 usable")
    expect(page.locator("#data-seen .fs-side").first).to_have_text("chosen")
    expect(page.locator("#data-seen .fs-side").nth(1)).to_have_text("rejected")
    assert page.locator("#data-seen .fs-trained").count() == 2  # each answer, after the same prompt
    screenshot(page, "preference-data")

    page.get_by_role("tab", name="Train").click()
    page.locator("#train-objective input[value=dpo]").check()
    page.locator("#train-max-steps input").fill(str(STEPS))
    page.locator("#train-max-steps input").press("Tab")
    page.get_by_text("LoRA and evaluation").click()
    page.locator("#train-eval-steps input").fill("8")
    page.locator("#train-eval-steps input").press("Tab")
    page.locator("#train-button").click()
    status = page.locator("#train-status")
    expect(status).to_contain_text("Reward accuracy", timeout=240_000)  # streamed with the loss
    expect(status).to_contain_text("Finished", timeout=600_000)
    (run,) = studio.registry.trained()
    assert run.config().training.objective == "dpo"
    page.wait_for_function(
        """() => { const el = document.querySelector('#loss-plot .js-plotly-plot');
        return el && el.data && el.data.some(d => d.name === 'reward accuracy (held-out)' && d.y.length >= 3); }""",
        timeout=60_000,
    )
    held_out = _reward_points(page, "reward accuracy (held-out)")  # step 0 (the base: no margin), 8, 16, 24
    assert held_out[-1] >= max(held_out[1], 0.6), held_out
    screenshot(page, "preference-train")

    page.get_by_role("tab", name="Chat").click()
    page.locator("#chat-run input").click()
    page.get_by_role("option").filter(has_text=run.id).first.click()
    expect(page.locator("#chat-status")).to_contain_text("adapter disabled", timeout=60_000)
    page.locator("#chat-input textarea").fill("What is 12 plus 7?")
    page.locator("#chat-send").click()
    for pane in ("#chat-base", "#chat-adapted"):
        expect(page.locator(f"{pane} [data-testid=bot]").last).not_to_be_empty(timeout=120_000)

    page.get_by_role("tab", name="Evaluate").click()
    page.locator("#eval-run input").click()
    page.get_by_role("option").filter(has_text=f"{run.id} v1").click()
    page.locator("#eval-rows input[type=number]").fill("8")
    page.locator("#eval-rows input[type=number]").press("Tab")
    page.locator("#eval-general input[type=number]").fill("0")
    page.locator("#eval-general input[type=number]").press("Tab")
    page.locator("#eval-start").click()
    expect(page.locator("#eval-scores")).to_contain_text("preference accuracy (held-out pairs)", timeout=300_000)
    from studio.evaluation import stored

    pref = stored.evaluations(run)[0]["preference"]
    assert pref["adapter"] > pref["base"], pref
    expect(page.locator("#eval-summary")).to_contain_text(pref["verdict"])
    screenshot(page, "preference-evaluate")

    page.get_by_role("tab", name="Export").click()
    page.locator("#export-run input").click()
    page.get_by_role("option").filter(has_text=run.id).first.click()
    expect(page.locator("#export-button")).to_be_enabled(timeout=60_000)
    with page.expect_download(timeout=60_000) as download:
        page.locator("#export-button").click()
    zipped = tmp_path / "adapter.zip"
    download.value.save_as(zipped)
    zipfile.ZipFile(zipped).extractall(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(models.resolve("default"))
    PeftModel.from_pretrained(base, str(tmp_path / "adapter"))  # plain PEFT, no studio code
    assert not errors, errors
    page.close()
