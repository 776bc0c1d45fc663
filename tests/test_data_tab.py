"""The Data tab's handlers, called without a browser: an upload fills the report, preview, token
lengths and column mapping by name; a bad file or an unloadable model is a sentence; a changed
mapping validates again. Tokens are counted with the tiny model's tokenizer (nothing trains)."""

import gradio as gr
import pandas as pd
import pytest

from studio.service import Studio
from studio.ui import data_tab
from studio.ui.data_tab import NONE
from tests.helpers import SAMPLE

pytestmark = pytest.mark.unit


@pytest.fixture
def tab(tmp_path, tiny_model_dir):
    studio = Studio(tmp_path / "runs")
    with gr.Blocks():
        tab = data_tab.build_data_tab(gr.State(None), gr.State(""))
        data_tab.wire_data_tab(studio, tab, gr.Textbox(str(tiny_model_dir)), gr.Number(512))
    return studio, tab


def _data(tab, **values):
    """An event's {component: value}: the Train tab's model and max length, plus ``values`` by
    the tab's field name (``roles`` by role)."""
    roles = values.pop("roles", {})
    data = {tab.model: tab.model.value, tab.max_length: tab.max_length.value}
    data |= {box: roles.get(role, NONE) for role, box in tab.roles.items()}
    return data | {getattr(tab, name): value for name, value in values.items()}


def _role_values(tab, out) -> dict:
    return {role: out[box].value for role, box in tab.roles.items()}


def test_an_uploaded_sample_fills_the_report_preview_and_mapping_by_name(tab):
    studio, tab = tab
    out = data_tab.uploaded(studio, tab, _data(tab, upload=str(SAMPLE)))
    assert set(out) == set(tab.outputs)  # every output, by name
    # The upload is kept next to the runs (the browser's temp file goes away); detection is not a choice.
    assert out[tab.dataset_path].startswith(str((studio.runs_root / "datasets").resolve()))
    assert out[tab.mapping] == ""
    assert "instruction / input / output" in out[tab.report] and "300 usable" in out[tab.report]
    assert isinstance(out[tab.preview], pd.DataFrame) and out[tab.preview].iloc[0, 0].startswith("What is")
    assert _role_values(tab, out) == {
        "prompt": "instruction",
        "input": NONE,
        "response": "output",
        "system": NONE,
        "messages": NONE,
        "text": NONE,
        "chosen": NONE,
        "rejected": NONE,
        "label": NONE,
    }
    assert (NONE, NONE) in out[tab.roles["prompt"]].choices and ("output", "output") in out[tab.roles["prompt"]].choices
    assert len(out[tab.histogram].data[0].x) == 300
    assert "Usable row 1 of 300" in out[tab.seen] and "fs-trained" in out[tab.seen] and out[tab.seen_index] == 0

    # Previous and Next step through the usable rows, wrapping around.
    moved = data_tab.step_seen(tab, 1, {tab.view: out[tab.view], tab.seen_index: 0})
    assert moved[tab.seen_index] == 1 and "Usable row 2 of 300" in moved[tab.seen]
    back = data_tab.step_seen(tab, -1, {tab.view: out[tab.view], tab.seen_index: 0})
    assert "Usable row 300 of 300" in back[tab.seen]


def test_a_bad_file_gives_a_sentence_not_a_traceback(tab, tmp_path):
    studio, tab = tab
    bad = tmp_path / "bad.json"
    bad.write_text('[{"prompt": "cut off', encoding="utf-8")
    out = data_tab.uploaded(studio, tab, _data(tab, upload=str(bad)))
    report = out[tab.report]
    assert report.startswith("**Can't use this file.**") and "not valid JSON" in report
    assert "Traceback" not in report
    assert out[tab.dataset_path] is None and out[tab.view] is None and out[tab.preview].empty
    assert set(_role_values(tab, out).values()) == {NONE}
    assert not (studio.runs_root / "datasets").exists()  # nothing kept of a file that cannot be read


def test_a_changed_column_mapping_revalidates(tab, tmp_path):
    studio, tab = tab
    odd = tmp_path / "odd.csv"
    odd.write_text("name,age\n<b>alice</b>,3\nbob,4\n", encoding="utf-8")
    first = data_tab.uploaded(studio, tab, _data(tab, upload=str(odd)))
    assert first[tab.report].startswith("**Can't use these columns yet.**")
    assert "No usable columns found" in first[tab.report]
    assert ("name", "name") in first[tab.roles["prompt"]].choices  # the columns to pick from
    path = first[tab.dataset_path]

    # One role picked: still not enough, and the choice stays on its dropdown.
    half = data_tab.remapped(studio, tab, _data(tab, dataset_path=path, roles={"prompt": "name"}))
    assert half[tab.report].startswith("**Can't use these columns yet.**")
    assert half[tab.roles["prompt"]].value == "name" and half[tab.mapping] == ""

    both = data_tab.remapped(studio, tab, _data(tab, dataset_path=path, roles={"prompt": "name", "response": "age"}))
    assert "your mapping" in both[tab.report] and "2 usable" in both[tab.report]
    assert both[tab.mapping] == "name=prompt,age=response"  # what the Train tab's config gets
    assert both[tab.dataset_path] == path
    assert _role_values(tab, both)["prompt"] == "name" and _role_values(tab, both)["response"] == "age"
    assert "&lt;b&gt;alice&lt;/b&gt;" in both[tab.seen] and "<b>" not in both[tab.seen]  # shown, never run


def test_a_model_that_cannot_load_keeps_the_file_and_says_what_to_change(tab, tmp_path):
    studio, tab = tab
    data = _data(tab, dataset_path=str(SAMPLE), mapping="")
    out = data_tab.settings_changed(studio, tab, data | {tab.model: str(tmp_path / "no-such-model")})
    assert out[tab.report].startswith("**Can't count tokens: the model cannot be loaded.**")
    assert "Change **Model** on the Train tab" in out[tab.report]
    assert out[tab.dataset_path] == str(SAMPLE)  # fixing the model brings the report back
    # The max length moves the token statistics: they are counted again.
    again = data_tab.settings_changed(studio, tab, data | {tab.max_length: 200})
    assert "**Rows:** 300" in again[tab.report] and "(max length 200)" in again[tab.report]


def test_samples_load_from_the_package_and_clear_empties_the_tab(tab):
    studio, tab = tab
    out = data_tab.load_sample(studio, tab, "instructions", _data(tab))
    assert out[tab.dataset_path] == str(data_tab.SAMPLES / "instructions.csv")
    assert "300 usable" in out[tab.report]
    cleared = data_tab.cleared(studio, tab, _data(tab))
    assert cleared[tab.report] == data_tab.EMPTY_REPORT and cleared[tab.dataset_path] is None
    assert cleared[tab.histogram] is None and cleared[tab.seen] == ""
    no_file = data_tab.uploaded(studio, tab, _data(tab, upload=None))
    assert no_file[tab.report] == data_tab.EMPTY_REPORT


def test_the_preference_sample_is_detected_with_its_roles(tab):
    """Issue 25: the bundled preference pairs fill the chosen and rejected boxes; a person's
    remapping keeps them."""
    studio, tab = tab
    out = data_tab.load_sample(studio, tab, "preferences", _data(tab))
    assert "preference pairs: prompt, chosen, rejected" in out[tab.report] and "300 usable" in out[tab.report]
    roles = _role_values(tab, out)
    assert (roles["prompt"], roles["chosen"], roles["rejected"]) == ("prompt", "chosen", "rejected")
    seen = out[tab.seen]  # both sides after the same prompt, each answer marked trained
    assert seen.index("fs-side'>chosen") < seen.index("fs-side'>rejected") and seen.count("fs-trained") == 2
    again = data_tab.remapped(studio, tab, _data(tab, dataset_path=out[tab.dataset_path], roles=roles))
    assert "preference pairs" in again[tab.report] and _role_values(tab, again) == roles
