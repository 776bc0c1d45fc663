"""The whole journey in a real browser (headless Debian Chromium driven by playwright):
upload -> train (live plots) -> second tab reattaches and stops it -> chat in both panes ->
download the zip, which loads in plain PEFT. Uses the real default model."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest

from studio.export.gguf_export import gguf_name
from studio.runs.records import TrainRecord
from tests.helpers import SAMPLE, open_page, screenshot, serve

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from studio.service import Studio

    studio = Studio(tmp_path_factory.mktemp("browser-runs"))
    url, demo = serve(studio)
    yield url, studio
    studio.stop_training()
    demo.close()


def _points(page, plot: str) -> int:
    return page.evaluate(f"""() => {{
        const el = document.querySelector('#{plot} .js-plotly-plot');
        return el && el.data && el.data[0] ? el.data[0].x.length : 0; }}""")


def test_method_picker_follows_the_settings(server, browser):
    """The memory plan redraws as settings change, and its buttons change the settings."""
    from playwright.sync_api import expect

    url, _ = server
    page, errors = open_page(browser, url)
    page.get_by_role("tab", name="Train").click()
    plan = page.locator("#memory-plan")
    expect(plan.locator("tr.fs-plan-row")).to_have_count(3, timeout=30_000)
    expect(plan).to_contain_text("micro-batch 4 x 512 tokens (max length 512)")
    expect(plan.locator("tr.fs-chosen")).to_have_attribute("data-method", "lora")
    page.wait_for_function(
        """() => { const el = document.querySelector('#memory-bar .js-plotly-plot');
        return el && el.data && el.data.length >= 4 && el.data[0].y.length === 3; }""",
        timeout=30_000,
    )
    before = plan.locator("tr[data-method=lora] td").nth(2).inner_text()

    page.locator("#train-checkpointing input").check()
    expect(plan).to_contain_text("gradient checkpointing", timeout=30_000)
    after = plan.locator("tr[data-method=lora] td").nth(2).inner_text()
    assert after != before, (before, after)  # checkpointing lowers the estimate shown

    # The default model fits in full here, so the picker recommends it and switching takes
    # the learning rate down with it.
    expect(plan.locator(".fs-plan-rec")).to_have_attribute("data-recommended", "full")
    page.locator("#plan-use-recommended").click()
    expect(plan.locator("tr.fs-chosen")).to_have_attribute("data-method", "full", timeout=30_000)
    expect(page.locator("#method-picker input[value=full]")).to_be_checked()
    assert float(page.locator("#train-lr input").input_value()) == 2e-5

    # A setting it cannot use is named in place of the table.
    page.locator("#train-max-length input").fill("8")
    page.locator("#train-max-length input").press("Tab")
    expect(plan).to_contain_text("data.max_length", timeout=30_000)
    assert not errors, errors
    page.close()


def test_upload_train_chat_export(server, browser, tmp_path):
    from playwright.sync_api import expect

    url, studio = server
    page, errors = open_page(browser, url)

    # A file it cannot read gets a sentence, not a traceback; the app stays up.
    bad = tmp_path / "bad.json"
    bad.write_text('[{"prompt": "cut off', encoding="utf-8")
    page.set_input_files("#data-upload input[type=file]", str(bad))
    expect(page.locator("#data-report")).to_contain_text("not valid JSON", timeout=30_000)
    expect(page.locator("#data-report")).not_to_contain_text("Traceback")

    # Columns it does not know: the person maps them by hand. A cell holding HTML shows as text.
    odd = tmp_path / "odd.csv"
    odd.write_text("name,age\n<img src=x onerror=window.__xss=1>,3\nbob,4\n", encoding="utf-8")
    page.locator("#data-upload button[aria-label='Clear']").first.click()
    page.set_input_files("#data-upload input[type=file]", str(odd))
    expect(page.locator("#data-report")).to_contain_text("No usable columns found", timeout=30_000)
    for role, column in (("prompt", "name"), ("response", "age")):
        page.locator(f"#data-map-{role} input").click()
        page.locator(f"#data-map-{role}").get_by_role("option", name=column, exact=True).click()
    expect(page.locator("#data-report")).to_contain_text("your mapping", timeout=30_000)
    expect(page.locator("#data-seen")).to_contain_text("<img src=x onerror=window.__xss=1>")
    assert page.evaluate("window.__xss") is None
    assert page.locator("#data-seen img").count() == 0

    page.locator("#data-upload button[aria-label='Clear']").first.click()
    page.set_input_files("#data-upload input[type=file]", str(SAMPLE))
    expect(page.locator("#data-report")).to_contain_text("instruction / input / output", timeout=30_000)
    expect(page.locator("#data-report")).to_contain_text("300 usable")
    expect(page.locator("#data-preview")).to_contain_text("What is")
    page.wait_for_function(
        """() => { const el = document.querySelector('#data-histogram .js-plotly-plot');
        return el && el.data && el.data[0] && el.data[0].x.length === 300; }""",
        timeout=30_000,
    )
    expect(page.locator("#data-seen .fs-trained").first).to_contain_text("ANSWER:")
    expect(page.locator("#data-seen .fs-masked").first).to_be_visible()
    page.locator("#data-seen-next").click()
    expect(page.locator("#data-seen")).to_contain_text("Usable row 2 of 300")
    screenshot(page, "data")

    # The memory plan now uses the data's longest row rather than max length.
    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#memory-plan")).to_contain_text("your data's longest row", timeout=30_000)
    screenshot(page, "plan")

    # Train a long run so that it is still going when a second tab attaches and stops it.
    page.locator("#train-max-steps input").fill("200")
    page.locator("#train-max-steps input").press("Tab")
    page.locator("#train-button").click()
    page.wait_for_function(
        """() => { const el = document.querySelector('#loss-plot .js-plotly-plot');
        return el && el.data && el.data[0] && el.data[0].x.length >= 2; }""",
        timeout=180_000,
    )
    expect(page.locator("#train-status")).to_contain_text("Running")
    expect(page.locator("#train-status")).to_contain_text("Memory check")
    assert _points(page, "memory-plot") >= 2
    screenshot(page, "train")

    # A second Train while one runs is queued with its position, and can be cancelled.
    expect(page.locator("#train-button")).to_have_text("Queue another run", timeout=20_000)
    page.locator("#train-button").click()
    expect(page.locator("#train-status")).to_contain_text("Waiting to start: 1.", timeout=30_000)
    queued_id = studio.jobs.queue[0].run.id
    page.locator("#cancel-queued-button").click()
    expect(page.locator("#train-status")).not_to_contain_text("Waiting to start", timeout=30_000)
    expect(page.locator("#cancel-queued-button")).to_be_hidden()
    assert not (studio.registry.root / queued_id).exists()

    run_id = studio.jobs.current.run.id
    second, errors2 = open_page(browser, url)
    second.get_by_role("tab", name="Train").click()
    expect(second.locator("#train-status")).to_contain_text(run_id, timeout=20_000)
    expect(second.locator("#stop-button")).to_be_enabled(timeout=20_000)
    second.locator("#stop-button").click()
    expect(second.locator("#train-status")).to_contain_text("Stopped at step", timeout=120_000)
    expect(page.locator("#train-status")).to_contain_text("Finished", timeout=30_000)
    second.close()
    stopped_at = studio.registry.get(run_id).status().step
    assert studio.registry.get(run_id).status().stopped is True

    # The stopped run is resumable from the checkpoint Stop saved: resume it, then stop it again.
    page.locator("#resume-run input").click()
    page.get_by_role("option").filter(has_text=run_id).first.click()
    page.locator("#resume-button").click()
    expect(page.locator("#train-status")).to_contain_text("Running", timeout=60_000)
    page.wait_for_function(
        f"""() => {{ const el = document.querySelector('#loss-plot .js-plotly-plot');
        return el && el.data && el.data[0] && Math.max(...el.data[0].x) > {stopped_at}; }}""",
        timeout=120_000,
    )
    expect(page.locator("#stop-button")).to_be_enabled(timeout=20_000)
    page.locator("#stop-button").click()
    expect(page.locator("#train-status")).to_contain_text("Stopped at step", timeout=120_000)
    resumed = studio.registry.get(run_id).status()
    assert resumed.stopped is True and resumed.step > stopped_at

    # Chat: both panes answer the same prompt.
    page.get_by_role("tab", name="Chat").click()
    page.locator("#chat-run input").click()
    page.get_by_role("option").filter(has_text=run_id).first.click()
    expect(page.locator("#chat-status")).to_contain_text("adapter disabled", timeout=60_000)
    page.locator("#chat-input textarea").fill("What is the capital of Italy?")
    page.locator("#chat-send").click()
    for pane in ("#chat-base", "#chat-adapted"):
        expect(page.locator(f"{pane} [data-testid=bot]").last).not_to_be_empty(timeout=120_000)
    page.wait_for_function(
        """() => ['chat-base', 'chat-adapted'].every(id => {
        const t = document.querySelector('#' + id + ' [data-testid=status-tracker]');
        return !t || t.classList.contains('hide'); })""",
        timeout=120_000,
    )
    assert page.locator("#chat-base [data-testid=user]").count() == 1
    assert page.locator("#chat-adapted [data-testid=user]").count() == 1
    screenshot(page, "chat")

    # The same adapter from code: the page's Python snippet, run as it is, answers through /v1.
    page.get_by_text("Call it from code: the OpenAI-compatible API").click()
    expect(page.locator("#api-python")).to_contain_text(run_id, timeout=30_000)
    code = page.locator("#api-python .cm-content").inner_text()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip(), code + proc.stderr
    page.locator("#api-usage-refresh").click()
    expect(page.locator("#api-usage")).to_contain_text(run_id, timeout=30_000)

    # Export: pick the run, download, and the zip has what the card promises.
    page.get_by_role("tab", name="Export").click()
    page.locator("#export-run input").click()
    page.get_by_role("option").filter(has_text=run_id).first.click()
    expect(page.locator("#export-button")).to_be_enabled(timeout=60_000)
    screenshot(page, "export")
    with page.expect_download(timeout=60_000) as dl:
        page.locator("#export-button").click()
    zpath = tmp_path / "adapter.zip"
    dl.value.save_as(zpath)
    names = set(zipfile.ZipFile(zpath).namelist())
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "config.yaml", "README.md"} <= names

    # GGUF (q8_0, the default type): built, read back, compared, and the numbers shown on the page.
    page.locator("#gguf-build").click()
    expect(page.locator("#gguf-download")).to_be_enabled(timeout=400_000)
    expect(page.locator("#gguf-status")).to_contain_text("Checked against the merged model")
    gguf_zip_name = gguf_name(studio.registry.get(run_id), "q8_0")  # <run>-v2-...: the run was resumed
    expect(page.locator("#gguf-status")).to_contain_text(gguf_zip_name)
    expect(page.locator("#gguf-status")).to_contain_text("q8_0: same greedy answer on")
    screenshot(page, "export-gguf")
    with page.expect_download(timeout=120_000) as dl:
        page.locator("#gguf-download").click()
    gpath = tmp_path / "model.gguf.zip"
    dl.value.save_as(gpath)
    gguf_zip = zipfile.ZipFile(gpath)
    assert {gguf_zip_name.removesuffix(".zip"), "Modelfile", "README.md", "parity.json"} <= set(gguf_zip.namelist())
    parity = json.loads(gguf_zip.read("parity.json"))
    assert parity["passed"] and parity["tokenizer_same"] and parity["template_same"] and parity["layout_diff"] < 1e-5
    modelfile = gguf_zip.read("Modelfile").decode()
    # SmolLM2's template writes its own system prompt when none is given: Ollama gets it as SYSTEM.
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile and 'stop "<|im_end|>"' in modelfile
    assert not errors and not errors2, errors + errors2

    # Past runs: overlay two runs' curves and list the settings that differ.
    trained = studio.registry.get(run_id)
    other = studio.registry.create(trained.config().with_overrides({"training.learning_rate": 1e-4}))
    for step, loss in enumerate([2.0, 1.6, 1.3, 1.1], start=1):
        other.append_metrics(TrainRecord(step=step, loss=loss))
    other.set_status("finished", step=4, total_steps=4, final_loss=1.1)
    runs_page, errors3 = open_page(browser, url)
    runs_page.get_by_role("tab", name="Train").click()
    runs_page.get_by_text("Past runs: compare curves and settings").click()
    expect(runs_page.locator("#runs-table")).to_contain_text(other.id, timeout=30_000)
    for rid in (run_id, other.id):
        runs_page.locator("#runs-compare input").click()
        runs_page.get_by_role("option").filter(has_text=rid).first.click()
    expect(runs_page.locator("#runs-diff")).to_contain_text("training.learning_rate", timeout=30_000)
    runs_page.wait_for_function(
        """() => { const el = document.querySelector('#runs-overlay .js-plotly-plot');
        return el && el.data && el.data.filter(t => t.mode === 'lines').length === 2; }""",
        timeout=30_000,
    )
    assert not errors3, errors3
    runs_page.close()

    # The downloaded adapter loads in plain PEFT on the base model.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from studio.models import resolve

    out = tmp_path / "unzipped"
    zipfile.ZipFile(zpath).extractall(out)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve("default")), str(out))
    assert model.active_adapter == "default"


def pick_run_to_manage(page, run_id: str) -> None:
    """Pick a run in the rename/delete dropdown by typing it: near the foot of a long page its
    option list can open outside the viewport, where a click never lands."""
    from playwright.sync_api import expect

    box = page.locator("#runs-manage input")
    box.scroll_into_view_if_needed()
    box.click()
    box.fill(run_id)
    page.get_by_role("option").filter(has_text=run_id).first.wait_for()
    box.press("Enter")
    expect(box).to_have_value(run_id, timeout=10_000)


def test_chat_checkpoints_regenerate_evaluate_and_manage_runs(server, browser):
    """A checkpoint is selectable next to its run; Regenerate replaces the last answer; the
    evaluation table fills from training and Evaluate answers held-out prompts; a run is renamed
    and, once confirmed, deleted."""
    from playwright.sync_api import expect

    from studio.config import RunConfig
    from studio.training import run_training

    url, studio = server
    cfg = RunConfig.from_dict(
        {
            "data": {"path": str(SAMPLE), "max_length": 128, "eval_rows": 6},
            "training": {"max_steps": 6, "save_steps": 3, "batch_size": 2, "memory_check": False},
        }
    )
    run = studio.registry.create(cfg)
    assert run_training(cfg, run).state == "finished"
    page, errors = open_page(browser, url)
    page.get_by_role("tab", name="Chat").click()

    page.locator("#chat-run input").click()
    page.get_by_role("option").filter(has_text=f"{run.id} · checkpoint at step 3").click()
    expect(page.locator("#chat-status")).to_contain_text(f"{run.id}@step-3", timeout=60_000)
    page.locator("#chat-run input").click()
    page.get_by_role("option").filter(has_text=f"{run.id} v1").click()
    expect(page.locator("#chat-status")).to_contain_text("2 adapters kept loaded", timeout=60_000)
    # The table starts from the losses recorded in training: base at step 0, adapter at the end.
    expect(page.locator("#eval-table")).to_contain_text("adapter", timeout=30_000)
    expect(page.locator("#eval-table")).to_contain_text(f"{run.status().base_eval_loss:.4f}"[:5])

    page.locator("#chat-system textarea").fill("Answer in one word.")
    page.get_by_text("Sampling (the same for both panes)").click()
    page.locator("#chat-max-new input[type=number]").fill("16")
    page.locator("#chat-max-new input[type=number]").press("Tab")
    page.locator("#chat-input textarea").fill("Name a colour.")
    page.locator("#chat-send").click()

    def settled():
        page.wait_for_function(
            """() => ['chat-base', 'chat-adapted'].every(id => {
            const t = document.querySelector('#' + id + ' [data-testid=status-tracker]');
            return !t || t.classList.contains('hide'); })""",
            timeout=120_000,
        )

    for pane in ("#chat-base", "#chat-adapted"):
        expect(page.locator(f"{pane} [data-testid=bot]").last).not_to_be_empty(timeout=120_000)
    settled()
    first = page.locator("#chat-adapted [data-testid=bot]").last.inner_text()
    page.locator("#chat-regenerate").click()
    page.wait_for_timeout(500)
    settled()
    for pane in ("#chat-base", "#chat-adapted"):  # the last exchange was replaced, not appended
        assert page.locator(f"{pane} [data-testid=user]").count() == 1
        assert page.locator(f"{pane} [data-testid=bot]").count() == 1
    assert page.locator("#chat-adapted [data-testid=bot]").last.inner_text() == first  # greedy: same answer

    page.locator("#eval-button").click()
    expect(page.locator("#eval-notes")).to_contain_text("Held-out prompt 3", timeout=180_000)
    expect(page.locator("#eval-notes")).to_contain_text("Scored 6 held-out rows")
    assert run.evaluation()["rows"] == 6
    screenshot(page, "evaluate")

    page.get_by_role("tab", name="Train").click()
    page.get_by_text("Past runs: compare curves and settings").click()
    pick_run_to_manage(page, run.id)
    page.locator("#runs-new-name textarea").fill("colours v1")
    page.locator("#runs-rename").click()
    expect(page.locator("#runs-table")).to_contain_text("colours v1", timeout=30_000)
    assert run.name == "colours v1"
    pick_run_to_manage(page, run.id)
    page.locator("#runs-delete").click()
    expect(page.locator("#runs-manage-note")).to_contain_text("Tick the box", timeout=30_000)
    assert run.path.exists()
    page.locator("#runs-confirm-delete input").check()
    page.locator("#runs-delete").click()
    expect(page.locator("#runs-manage-note")).to_contain_text(f"Deleted {run.id}", timeout=30_000)
    expect(page.locator("#runs-table")).not_to_contain_text(run.id)
    assert not run.path.exists()
    assert not any(ref.startswith(run.id) for ref in studio.playground.loaded())  # unloaded too
    assert not errors, errors
    page.close()
