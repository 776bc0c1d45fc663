"""The Export tab's handlers, called without a browser: the run list holds finished runs, picking
one offers its adapter zip (and the merged model) for download, and an unknown or unfinished run or
a refused zip is a sentence. The unit tests need no trained model; the rest export the session's
trained tiny run (tests/conftest.py)."""

from pathlib import Path

import gradio as gr
import pytest

from studio.config import RunConfig
from studio.service import Studio
from studio.ui import export_tab


def _build(studio):
    with gr.Blocks():
        return export_tab.build_export_tab(studio)


@pytest.fixture
def empty(tmp_path):
    """The tab on a Studio with one run that was created but never trained."""
    studio = Studio(tmp_path / "runs")
    unfinished = studio.registry.create(RunConfig().with_overrides({"data.path": str(tmp_path / "train.csv")}))
    return studio, _build(studio), unfinished


@pytest.fixture(scope="module")
def exported(trained_tiny_run):
    studio = Studio(trained_tiny_run.path.parent)
    return studio, _build(studio), trained_tiny_run


def _offered(button) -> Path | None:
    """The file a DownloadButton update offers (Gradio copies it into its cache), if any."""
    return Path(button.value["path"]) if button.value else None


def _all_off(tab, out) -> bool:
    buttons = (tab.adapter_button, tab.merge, tab.merged_button, tab.gguf_build, tab.gguf_button)
    return all(out[b].interactive is False for b in buttons) and _offered(out[tab.adapter_button]) is None


@pytest.mark.unit
def test_an_unknown_or_unfinished_run_gives_a_sentence(empty):
    studio, tab, unfinished = empty
    assert export_tab.run_choices(studio) == [] and tab.run.choices == []  # only finished runs are listed
    for run_id in (unfinished.id, "no-such-run"):
        out = export_tab.prepare(studio, tab, run_id)
        assert set(out) == set(tab.prepare_outputs)
        assert out[tab.note].startswith("**Can't export.**") and "Traceback" not in out[tab.note]
        assert _all_off(tab, out) and out[tab.contents].empty
    nothing = export_tab.prepare(studio, tab, None)
    assert nothing[tab.note] == "" and _all_off(tab, nothing)

    merged = export_tab.build_merged(studio, tab, unfinished.id)
    assert merged[tab.note].startswith("**Can't build the merged model.**")
    assert merged[tab.merged_button].interactive is False
    assert export_tab.build_merged(studio, tab, None)[tab.note] == "Pick a run first."
    gguf = export_tab.build_gguf(studio, tab, {tab.run: "no-such-run", tab.quant: "q8_0"})
    assert gguf[tab.gguf_note].startswith("**Can't build the GGUF.**") and gguf[tab.gguf_button].interactive is False
    changed = export_tab.quant_changed(tab)
    assert changed[tab.gguf_note] == "" and changed[tab.gguf_button].interactive is False


@pytest.mark.unit
def test_a_refused_zip_gives_a_sentence_and_adds_no_run(empty, tmp_path):
    studio, tab, _ = empty
    before = len(studio.registry.list())
    not_a_zip = tmp_path / "adapter.zip"
    not_a_zip.write_bytes(b"this is not a zip file")
    out = export_tab.import_zip(studio, tab, {tab.import_upload: str(not_a_zip), tab.import_name: "mine"})
    assert out[tab.import_note].startswith("**Can't import.**") and "Traceback" not in out[tab.import_note]
    assert out[tab.run].value is None and len(studio.registry.list()) == before  # the list is left alone
    assert export_tab.import_zip(studio, tab, {tab.import_upload: None, tab.import_name: ""})[tab.import_note] == ""


def test_the_run_choices_list_finished_runs(exported):
    studio, tab, run = exported
    assert [value for _, value in tab.run.choices] == [run.id]
    assert [value for _, value in export_tab.refreshed_choices(studio).choices] == [run.id]


def test_a_finished_run_offers_its_adapter_zip_and_merged_model(exported):
    studio, tab, run = exported
    out = export_tab.prepare(studio, tab, run.id)
    zip_name = f"{run.id}-v1-adapter.zip"
    offered = _offered(out[tab.adapter_button])
    assert offered.is_file() and offered.name == zip_name and out[tab.adapter_button].interactive is True
    assert (run.path / zip_name).is_file()  # built in the run folder; Gradio serves its copy
    assert out[tab.merge].interactive is True and out[tab.gguf_build].interactive is True
    assert out[tab.merged_button].interactive is False and out[tab.gguf_button].interactive is False
    assert out[tab.note].startswith(f"Ready: `{zip_name}`")
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(out[tab.contents]["file"])

    merged = export_tab.build_merged(studio, tab, run.id)
    assert merged[tab.note].startswith("Merged model ready: ") and merged[tab.merged_button].interactive is True
    assert _offered(merged[tab.merged_button]).is_file()
