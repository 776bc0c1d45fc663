"""The Evaluate tab's handlers, called without a browser: Evaluate scores the session's trained
tiny run and shows the stored result; picking the run again (a reload) shows the same numbers; the
drill-down filters and downloads what it shows; the runs table, the model card and the adapter
zip carry the task scores."""

import csv
import json
import zipfile
from pathlib import Path

import gradio as gr
import pytest

from studio.evaluation import stored
from studio.service import Studio
from studio.ui import eval_tab


def _build(studio):
    with gr.Blocks() as demo:
        tab = eval_tab.build_eval_tab(studio)
    return demo, tab


def _path(button) -> str:
    value = button.value  # gradio keeps a download's file as FileData
    return value["path"] if isinstance(value, dict) else value


def _settings(tab, **values):
    data = {comp: comp.value for comp in tab.settings}
    return data | {getattr(tab, name): value for name, value in values.items()}


@pytest.mark.unit
def test_nothing_picked_or_nothing_stored_says_what_to_do(tmp_path):
    studio = Studio(tmp_path / "runs")
    _, tab = _build(studio)
    assert eval_tab.pick(studio, tab, None)[tab.summary] == eval_tab.PICK
    assert "no-such-run" in eval_tab.pick(studio, tab, "no-such-run")[tab.summary]


@pytest.fixture(scope="module")
def evaluated(trained_tiny_run):
    """The tab's Evaluate on the tiny run: 5 rows, 5 general prompts, and a judge nobody answers at."""
    from tests.helpers import free_port

    studio = Studio(trained_tiny_run.path.parent)
    _, tab = _build(studio)
    settings = _settings(
        tab,
        run=trained_tiny_run.id,
        rows=5,
        general=5,
        judge_url=f"http://127.0.0.1:{free_port()}/v1",
        judge_model="judge",
        judge_key="sk-secret-0123",
    )
    shown = eval_tab.evaluate(studio, tab, settings, progress=lambda *a, **k: None)
    return studio, tab, trained_tiny_run, shown


def test_a_judge_that_is_not_there_is_a_sentence_and_the_scores_stay(evaluated):
    studio, tab, run, shown = evaluated
    result = stored.evaluations(run)[0]
    assert "refused the connection" in result["judge"]["error"]
    assert "LLM judge" in shown[tab.summary] and "refused the connection" in shown[tab.summary]
    assert result["metrics"] and result["regression"]["prompts"] == 5
    assert "Outside your task" in shown[tab.summary]
    assert "sk-secret-0123" not in Path(result["path"]).read_text(encoding="utf-8")


@pytest.mark.unit
def test_judge_settings_it_cannot_use_stop_before_anything_runs(tmp_path, monkeypatch):
    studio = Studio(tmp_path / "runs")
    _, tab = _build(studio)
    warned = []
    monkeypatch.setattr(gr, "Warning", warned.append)
    monkeypatch.setattr(studio, "evaluate_task", lambda *a, **k: pytest.fail("no evaluation should start"))
    eval_tab.evaluate(studio, tab, _settings(tab, run="some-run", judge_url="ftp://x", judge_model="m"))
    assert warned and "http" in warned[0]  # and evaluate_task was never called


def test_evaluate_shows_scores_with_intervals_and_a_reload_shows_the_same(evaluated):
    studio, tab, run, shown = evaluated
    assert "Can't evaluate" not in str(shown[tab.summary]), shown[tab.summary]
    result = stored.evaluations(run)[0]
    primary = result["metrics"][0]
    scores = shown[tab.scores]
    assert list(scores["metric"]) == [m["name"] for m in result["metrics"]]
    assert scores["adapter 95% interval"][0] == f"{primary['adapter_ci95'][0]:.3f} to {primary['adapter_ci95'][1]:.3f}"
    assert scores["wins / ties / losses"][0] == f"{primary['wins']} / {primary['ties']} / {primary['losses']}"
    assert result["verdicts"][0] in shown[tab.summary]

    again = eval_tab.pick(studio, tab, run.id)  # what a reload or another browser shows
    assert again[tab.history].value == result["path"]
    assert again[tab.summary] == shown[tab.summary]
    assert again[tab.scores].equals(scores)
    assert run.id in set(again[tab.comparison]["run"])


def test_the_drill_down_filters_and_downloads_what_it_shows(evaluated):
    studio, tab, run, shown = evaluated
    result = stored.evaluations(run)[0]
    everything = shown[tab.table]
    assert len(everything) == result["rows"] and {"prompt", "reference", "base", "adapter"} <= set(everything)
    for show in stored.filter_choices(result):
        out = eval_tab.filter_rows(studio, tab, {tab.run: run.id, tab.history: result["path"], tab.show: show})
        frame, button = out[tab.table], out[tab.csv]
        with open(_path(button), encoding="utf-8", newline="") as f:
            assert len(list(csv.DictReader(f))) == len(frame)  # the file holds the rows shown
    primary = result["metrics"][0]
    out = eval_tab.filter_rows(studio, tab, {tab.run: run.id, tab.history: result["path"], tab.show: stored.SAME_SCORE})
    assert len(out[tab.table]) == primary["ties"]
    lines = [json.loads(x) for x in open(_path(shown[tab.jsonl]), encoding="utf-8")]
    assert len(lines) == result["rows"] and set(lines[0]["scores"]) == {m["name"] for m in result["metrics"]}


def test_runs_table_card_and_zip_carry_the_task_scores(evaluated, tmp_path):
    from studio.export.model_card import model_card
    from studio.export.zips import export_zip
    from studio.ui.views import runs_frame

    studio, tab, run, _ = evaluated
    result = stored.latest_of_weights(run)
    headline = stored.headline(result)
    assert headline.startswith(result["metrics"][0]["name"])
    assert headline in set(runs_frame(studio)["task score"])
    assert result["verdicts"][0] in model_card(run)
    names = zipfile.ZipFile(export_zip(run, tmp_path / "a.zip")).namelist()
    assert {stored.TASK_RESULT, stored.TASK_EXAMPLES} <= set(names)
    carried = json.loads(zipfile.ZipFile(tmp_path / "a.zip").read(stored.TASK_RESULT))
    assert carried["metrics"] == result["metrics"] and str(run.path) not in json.dumps(carried)  # no local paths

    # Imported back (into another runs folder): read as the source run's files, not as adapter files.
    imported = Studio(tmp_path / "other-runs").import_adapter(tmp_path / "a.zip")
    assert "Skipped" not in (imported.status().message or "")
    assert not list(imported.path.rglob(stored.TASK_RESULT)) and stored.evaluations(imported) == []


def test_score_every_checkpoint_of_a_run_that_kept_none_is_a_sentence(evaluated):
    studio, tab, run, _ = evaluated  # 6 steps: no checkpoint kept
    out = eval_tab.score_checkpoints(studio, tab, _settings(tab, run=run.id), progress=lambda *a, **k: None)
    assert "Can't score the checkpoints" in out[tab.summary] and "kept no checkpoints" in out[tab.summary]
