"""The Export tab in a real browser, on the tiny model (no default model needed): see what the zip
holds, download the merged model, import an adapter zip, and get a sentence for a hostile one."""

from __future__ import annotations

import zipfile

import pytest

from tests.helpers import open_page, screenshot, serve, tiny_run_config, write_csv

pytestmark = [pytest.mark.browser]


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    from studio.service import Studio
    from studio.training import run_training

    root = tmp_path_factory.mktemp("browser-export")
    studio = Studio(root / "runs")
    data = write_csv(
        root / "train.csv",
        ["instruction", "output"],
        [[f"what is {a} plus {b}", f"answer {a + b}"] for a in range(1, 9) for b in range(1, 6)],
    )
    cfg = tiny_run_config(tiny_model_dir, data, max_steps=4, memory_check=False)
    run = studio.registry.create(cfg)
    assert run_training(cfg, run).state == "finished"
    url, demo = serve(studio)
    yield url, studio, run
    demo.close()


def test_export_contents_merged_download_and_import(app, browser, tmp_path):
    from playwright.sync_api import expect

    from studio.ui.views import run_label

    url, studio, run = app
    page, errors = open_page(browser, url)
    page.get_by_role("tab", name="Export").click()
    page.locator("#export-run input").click()
    page.get_by_role("option").filter(has_text=run.id).first.click()
    expect(page.locator("#export-button")).to_be_enabled(timeout=60_000)
    for name in ("adapter_model.safetensors", "loss_curve.svg", "fingerprint.json", "README.md"):
        expect(page.locator("#export-contents")).to_contain_text(name, timeout=30_000)
    expect(page.locator("#export-status")).to_contain_text(f"{run.id}-v1-adapter.zip")
    with page.expect_download(timeout=60_000) as dl:
        page.locator("#export-button").click()
    adapter = tmp_path / "adapter.zip"
    dl.value.save_as(adapter)

    # The merged model: build, then download a standalone safetensors model.
    page.locator("#export-merge").click()
    expect(page.locator("#export-merged-button")).to_be_enabled(timeout=60_000)
    expect(page.locator("#export-status")).to_contain_text("Merged model ready")
    with page.expect_download(timeout=60_000) as dl:
        page.locator("#export-merged-button").click()
    merged = tmp_path / "merged.zip"
    dl.value.save_as(merged)
    assert {"config.json", "model.safetensors", "README.md"} <= set(zipfile.ZipFile(merged).namelist())

    # Import: the zip comes back as a new run, selected in the list.
    page.get_by_text("Import an adapter zip").click()
    page.locator("#import-name textarea, #import-name input").first.fill("Shared copy")
    page.set_input_files("#import-upload input[type=file]", str(adapter))
    expect(page.locator("#import-status")).to_contain_text("Imported as Shared copy", timeout=60_000)
    expect(page.locator("#export-run input")).to_have_value(
        run_label(studio.registry.get("Shared-copy-imported")), timeout=30_000
    )
    expect(page.locator("#export-contents")).to_contain_text("adapter_model.safetensors", timeout=30_000)
    assert studio.registry.get("Shared-copy-imported").status().imported is True
    screenshot(page, "export")

    # A hostile zip gets a sentence, and nothing is added.
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(adapter) as zin, zipfile.ZipFile(evil, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
        zout.writestr("../evil.json", b"{}")
    runs_before = len(studio.registry.list())
    page.locator("#import-upload button[aria-label='Clear']").first.click()
    page.set_input_files("#import-upload input[type=file]", str(evil))
    expect(page.locator("#import-status")).to_contain_text("Can't import", timeout=60_000)
    expect(page.locator("#import-status")).to_contain_text("outside its folder")
    expect(page.locator("#import-status")).not_to_contain_text("Traceback")
    assert len(studio.registry.list()) == runs_before
    assert not errors, errors
    page.close()
