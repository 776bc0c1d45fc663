"""The Train tab's handlers, called without a browser: the declared form builds the config by
name, a suggested change lands on the right controls, an emptied box is reported."""

import gradio as gr
import pytest

from studio.config import DEFAULT_LEARNING_RATE, ConfigError, RunConfig
from studio.runs.records import Retry
from studio.service import Studio
from studio.ui import train_tab

pytestmark = pytest.mark.unit


@pytest.fixture
def tab(tmp_path):
    studio = Studio(tmp_path / "runs")
    with gr.Blocks():
        dataset_path, mapping = gr.State(None), gr.State("")
        controls = train_tab.build_train_tab(studio, dataset_path, mapping)
    return studio, controls.tab


def _data(tab, **values):
    """An event's {component: value}: the form's defaults, a file, and ``values`` by dotted name."""
    data = {comp: comp.value for comp in tab.form.components}
    data |= {tab.dataset_path: "train.csv", tab.mapping: ""}
    data |= {tab.form.fields[name]: value for name, value in values.items()}
    return data


def test_every_form_field_is_a_config_setting_and_builds_the_config(tab):
    _, tab = tab
    names = set(tab.form.fields)
    assert names <= set(RunConfig().flat()) and {"model", "method", "training.compile", "lora.r"} <= names
    cfg = train_tab.form_config(tab, _data(tab, **{"training.batch_size": 8, "lora.targets": "q_proj,v_proj"}))
    expected = RunConfig().with_overrides(
        {"data.path": "train.csv", "training.batch_size": 8, "lora.targets": "q_proj,v_proj"}
    )
    assert cfg == expected


def test_an_emptied_box_is_reported_not_defaulted(tab):
    _, tab = tab
    with pytest.raises(ConfigError, match=r"`training.batch_size` must be int \(got None\)"):
        train_tab.form_config(tab, _data(tab, **{"training.batch_size": None}))


def test_a_suggested_change_lands_on_its_controls_by_name(tab):
    _, tab = tab
    kept = Retry(
        "Lower the batch size.",
        "full",
        {
            "training.batch_size": 2,
            "training.gradient_checkpointing": True,
            "training.compile": False,
            "not.a.field": 1,
        },
    )
    out = train_tab.apply_change(tab, kept, DEFAULT_LEARNING_RATE["lora"])
    fields = tab.form.fields
    assert out[fields["method"]].value == "full"
    assert out[fields["training.learning_rate"]] == DEFAULT_LEARNING_RATE["full"]  # full wants a tenth of LoRA's rate
    assert out[fields["training.batch_size"]] == 2 and out[fields["training.gradient_checkpointing"]] is True
    assert out[fields["training.compile"]] is False and len(out) == 5
    assert train_tab.apply_change(tab, None, DEFAULT_LEARNING_RATE["lora"]) == {tab.form.fields["method"]: gr.skip()}


def test_start_without_a_dataset_says_so_and_bad_settings_are_listed(tab):
    studio, tab = tab
    data = _data(tab)
    data[tab.dataset_path] = None
    status, _ = train_tab.start(studio, tab, data)
    assert "Upload a dataset" in status
    status, _ = train_tab.start(studio, tab, _data(tab, **{"lora.r": 0}))
    assert status.startswith("**Fix these settings first:**") and "`lora.r` must be between 1 and 256" in status


def test_poll_redraws_only_what_changed(tab):
    studio, tab = tab
    first = train_tab.poll(studio, tab, None, False)
    assert first[tab.status] and tab.past.runs_table in first  # the first draw fills everything
    # Nothing changed: nothing sent (a non-empty dict: Gradio reads an empty one as a single value).
    assert train_tab.poll(studio, tab, first[tab.shown], False) == {tab.shown: gr.skip()}


def test_the_memory_plans_suggested_change_lands_on_the_form(tab):
    """The plan's "Apply the suggested change" button: what show_plan keeps is what apply reads."""
    studio, tab = tab
    too_big = {"method": "full", "training.batch_size": 256, "data.max_length": 4096}
    shown = train_tab.show_plan(studio, tab, _data(tab, **too_big))
    assert set(shown) == set(tab.plan_outputs)
    kept = shown[tab.plan_state]
    assert shown[tab.apply_fix].visible and isinstance(kept["fix"], Retry) and kept["fix"].changes
    method, lr = tab.form.fields["method"], tab.form.fields["training.learning_rate"]
    nothing_fits = train_tab.use_recommendation(tab, kept, DEFAULT_LEARNING_RATE["full"])
    assert kept["recommended"] is None and nothing_fits == {method: gr.skip(), lr: gr.skip()}
    defaults = train_tab.show_plan(studio, tab, _data(tab))[tab.plan_state]  # LoRA; the default model fits
    use = train_tab.use_recommendation(tab, defaults, DEFAULT_LEARNING_RATE["lora"])
    assert use[method].value == defaults["recommended"] in ("full", "lora", "qlora")
    assert use[lr] == train_tab.switch_lr(DEFAULT_LEARNING_RATE["lora"], defaults["recommended"])
    out = train_tab.apply_plan_fix(tab, kept, DEFAULT_LEARNING_RATE["full"])
    assert out[tab.form.fields["method"]].value == kept["fix"].method
    assert all(out[tab.form.fields[k]] == v for k, v in kept["fix"].changes.items() if k in tab.form.fields)
    assert train_tab.apply_plan_fix(tab, None, 2e-4) == {tab.form.fields["method"]: gr.skip()}


def test_the_plan_estimates_packed_runs_at_full_rows_and_the_optimizer_moves_it(tab):
    """Packing fills every row to max length, so the plan may not use the data's shorter longest row;
    8-bit optimizer state is a quarter of AdamW's."""
    studio, _ = tab
    cfg = RunConfig.from_dict({"data": {"max_length": 256}, "method": "full"})
    studio._longest[(cfg.data.path, cfg.data.mapping, cfg.model)] = 40
    padded, basis = studio.memory_plan(cfg.with_overrides({"training.packing": "off"}))
    assert "x 40 tokens (your data's longest row" in basis
    packed, basis = studio.memory_plan(cfg.with_overrides({"training.packing": "on"}))
    assert "x 256 tokens (packed" in basis
    assert packed.get("full").estimate.total_bytes > padded.get("full").estimate.total_bytes
    small, _ = studio.memory_plan(cfg.with_overrides({"training.packing": "on", "training.optimizer": "adamw_8bit"}))
    state = {p.get("full").estimate.breakdown["optimizer_state"] for p in (packed, small)}
    assert state == {8 * packed.get("full").estimate.trainable_params, 2 * packed.get("full").estimate.trainable_params}
