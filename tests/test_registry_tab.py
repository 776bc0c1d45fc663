"""The Registry tab's handlers without a browser: deploy, promote, roll back, refusals, the
history and the versions table (issue 24). Versions are saved folders; no model is loaded."""

from __future__ import annotations

import pytest

from studio.runs.deployments import Deployments
from studio.service import Studio
from studio.ui import registry_tab
from tests.test_deployments import _run, _save_version

pytestmark = pytest.mark.unit


class _Tab:
    """The handlers use components only as keys: any distinct objects do."""

    def __init__(self):
        for name in registry_tab.RegistryTab.__dataclass_fields__:
            setattr(self, name, object())


def test_deploy_promote_roll_back_and_refusals_on_the_page(tmp_path):
    studio = Studio(tmp_path / "runs")
    run = _run(studio.registry, versions_=1)
    _save_version(run, b"second", kind="continued")
    tab = _Tab()
    data = {tab.name: "demo", tab.version: f"{run.id}@v1", tab.why: "first", tab.run: run.id}

    out = registry_tab.set_deployment(studio, tab, data)
    assert out[tab.status] == f"`demo` now serves `{run.id}@v1`."
    assert out[tab.deployments].values.tolist()[0][:2] == ["demo", f"{run.id}@v1"]

    out = registry_tab.set_deployment(studio, tab, data | {tab.version: f"{run.id}@v2", tab.why: "better"})
    assert out[tab.status] == f"`demo` now serves `{run.id}@v2` (was `{run.id}@v1`)."
    history = out[tab.history].values.tolist()
    assert [h[1:] for h in history] == [
        ["set", f"{run.id}@v1", f"{run.id}@v2", "better"],
        ["set", "", f"{run.id}@v1", "first"],
    ]
    versions = out[tab.versions]
    assert versions["version"].tolist() == ["v2", "v1"] and versions["deployed as"].tolist() == ["demo", ""]
    assert versions["from"].tolist() == ["v1", ""] and versions["kind"].tolist() == ["continued", "trained"]

    out = registry_tab.roll_back(studio, tab, data | {tab.why: "complaints"})
    assert out[tab.status] == f"`demo` rolled back to `{run.id}@v1` (from `{run.id}@v2`)."
    assert Deployments(studio.registry).get("demo").ref == f"{run.id}@v1"

    out = registry_tab.roll_back(studio, tab, data)
    assert out[tab.status].startswith("**Can't roll back.**") and "nothing" in out[tab.status]
    out = registry_tab.delete_version(studio, tab, data)  # v1 is deployed
    assert out[tab.status].startswith("**Can't delete.**") and "deployed as demo" in out[tab.status]
    out = registry_tab.set_deployment(studio, tab, data | {tab.name: run.id})
    assert "is a run id" in out[tab.status]
    out = registry_tab.set_deployment(studio, tab, data | {tab.name: " "})
    assert out[tab.status] == "Type a deployment name and pick a version first."
    with pytest.raises(ValueError, match="deployed as demo"):
        studio.delete_run(run.id)


def test_continuing_a_full_fine_tune_says_the_disk_it_will_take_first(tmp_path):
    from studio.ui.train_tab import continue_disk_note

    studio = Studio(tmp_path / "runs")
    run = _run(studio.registry, method="full", versions_=0)
    folder = run.next_version_dir()[1]
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 3 * 2**20)  # a "whole model" of 3 MiB
    run.commit_version(1, "trained")
    assert continue_disk_note(studio, run.id) == ""  # no trainer state kept: it cannot be continued
    run.final_state_dir.mkdir()
    (run.final_state_dir / "trainer_state.pt").write_bytes(b"")
    note = continue_disk_note(studio, run.id)
    assert note.startswith("Continuing saves **v2**, a whole model of about **3 MiB**") and "latest 2 versions" in note
