"""Registry tab: which adapter serves what, and a way back. Deployments (a name clients ask for,
pointing at one kept version) with their history; set, promote and roll back; every version of a
run with its lineage, disk use, scores and the deployments on it; deleting an old version.

Deployments live in the runs folder (studio/runs/deployments.py), so a change made here, by
`finetune-studio deploy` or by another server on the same folder is what the next API request gets;
the table re-reads the folder every few seconds. Handlers are module functions of the ``Studio`` and
the tab's components returning ``{component: value}``; tests call them without a browser
(tests/test_registry_tab.py)."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import gradio as gr
import pandas as pd

from studio.evaluation.stored import headline
from studio.formatting import format_bytes
from studio.models import ModelError
from studio.runs.deployments import DeploymentError, another_base
from studio.service import Studio
from studio.ui.views import ANOTHER_BASE

DEPLOYMENT_COLUMNS = ["deployment", "points at", "since", "changes", "note"]
HISTORY_COLUMNS = ["when", "action", "from", "to", "why"]
VERSION_COLUMNS = [
    "version",
    "kind",
    "from",
    "step",
    "saved",
    "disk",
    "eval loss",
    "task score",
    "deployed as",
    "settings changed",
    "data sha256",
    "weights sha256",
    "note",
]
REFRESH_S = 2.0  # how often the deployments table re-reads the runs folder (a CLI or another server may change it)


@dataclass
class RegistryTab:
    """The Registry tab's components that handlers read or update, by name."""

    deployments: gr.Dataframe
    name: gr.Textbox
    version: gr.Dropdown
    why: gr.Textbox
    deploy: gr.Button
    rollback: gr.Button
    status: gr.Markdown
    history: gr.Dataframe
    run: gr.Dropdown
    versions: gr.Dataframe
    delete: gr.Button
    refresh: gr.Button
    reevaluate: gr.Button
    retrain: gr.Button
    timer: gr.Timer  # re-reads the deployments while the tab is shown (app.py turns it on and off)


def build_registry_tab(studio: Studio) -> RegistryTab:
    gr.Markdown(
        'A **deployment** is a name a client asks for (`model="support-bot"` in `/v1`) that points at one '
        "kept adapter version (`RUN@vN`). Promoting or rolling back takes effect at the next request, in "
        "every server on this runs folder; requests already answering finish on their version. Every change "
        "is kept in the deployment's history."
    )
    deployments = gr.Dataframe(
        deployments_frame(studio), label="Deployments", elem_id="registry-deployments", interactive=False, wrap=True
    )
    with gr.Row():
        name = gr.Textbox(label="Deployment name", placeholder="support-bot", elem_id="registry-name", max_lines=1)
        version = gr.Dropdown(
            choices=version_choices(studio), value=None, label="Version", elem_id="registry-version", scale=2
        )
        why = gr.Textbox(label="Why (kept in the history)", elem_id="registry-why", max_lines=1)
    with gr.Row():
        deploy = gr.Button("Deploy / promote", variant="primary", elem_id="registry-deploy")
        rollback = gr.Button("Roll back", elem_id="registry-rollback")
        refresh = gr.Button("Refresh", elem_id="registry-refresh")
    status = gr.Markdown("", elem_id="registry-status")
    history = gr.Dataframe(
        pd.DataFrame(columns=HISTORY_COLUMNS), label="History", elem_id="registry-history", interactive=False, wrap=True
    )
    gr.Markdown("### Versions of a run")
    run = gr.Dropdown(choices=run_choices(studio), value=None, label="Run", elem_id="registry-run")
    versions = gr.Dataframe(
        pd.DataFrame(columns=VERSION_COLUMNS),
        label="Versions",
        elem_id="registry-versions",
        interactive=False,
        wrap=True,
    )
    with gr.Row():
        delete = gr.Button("Delete the version picked above", variant="stop", elem_id="registry-delete")
        reevaluate = gr.Button("Re-evaluate it on the current base", elem_id="registry-reevaluate")
        retrain = gr.Button("Retrain its run with the same settings", elem_id="registry-retrain")
    gr.Markdown(
        f"A version marked *{ANOTHER_BASE}* was trained on a base whose weights have changed since (updated or "
        "replaced under the same name): chat and the API refuse it. *Re-evaluate* scores it on the base there "
        "is now with the settings of its last evaluation (the Evaluate tab shows the result); *Retrain* starts "
        "a new run with the same settings on the Train tab's queue."
    )
    tab = RegistryTab(
        deployments,
        name,
        version,
        why,
        deploy,
        rollback,
        status,
        history,
        run,
        versions,
        delete,
        refresh,
        reevaluate,
        retrain,
        gr.Timer(REFRESH_S, active=False),
    )

    bind = functools.partial
    everything = [deployments, history, version, run, versions, status]
    deploy.click(bind(set_deployment, studio, tab), inputs={name, version, why, run}, outputs=everything)
    rollback.click(bind(roll_back, studio, tab), inputs={name, why, run}, outputs=everything)
    delete.click(bind(delete_version, studio, tab), inputs={version, name, run}, outputs=everything)
    refresh.click(bind(refreshed, studio, tab), inputs={name, run}, outputs=everything)
    reevaluate.click(bind(reevaluate_version, studio, tab), inputs={version, name, run}, outputs=everything)
    retrain.click(bind(retrain_version, studio, tab), inputs={version, name, run}, outputs=everything)
    name.change(bind(show_history, studio, tab), inputs=name, outputs=history)
    run.change(bind(show_versions, studio, tab), inputs=run, outputs=versions)
    tab.timer.tick(bind(deployments_frame, studio), outputs=deployments, show_progress="hidden")
    return tab


# ---- views -------------------------------------------------------------------------------------


def deployments_frame(studio: Studio) -> pd.DataFrame:
    rows = []
    for d in studio.deployments.list():
        note = ""
        try:
            run = studio.run(d.run)
            if another_base(run.get_version(d.version)):
                note = f"{ANOTHER_BASE}: requests are refused until it is retrained or rolled back"
        except (LookupError, ValueError):
            note = "the version is gone: requests are refused; point it at another version"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.updated_at))
        rows.append([d.name, d.ref, when, len(d.history), note])
    return pd.DataFrame(rows, columns=DEPLOYMENT_COLUMNS)


def history_frame(studio: Studio, name: str | None) -> pd.DataFrame:
    d = studio.deployments.get((name or "").strip())
    rows = [
        [
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"])),
            e["action"],
            e.get("from") or "",
            e["to"],
            e["why"],
        ]
        for e in reversed(d.history if d else [])  # newest first
    ]
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def versions_frame(studio: Studio, run_id: str | None) -> pd.DataFrame:
    if not run_id:
        return pd.DataFrame(columns=VERSION_COLUMNS)
    try:
        found = studio.version_rows(run_id)
    except LookupError:
        return pd.DataFrame(columns=VERSION_COLUMNS)
    rows = [
        [
            r["version"],
            r["kind"] or "",
            r["parent"] or "",
            r["step"],
            r["saved"],
            format_bytes(r["disk_bytes"]),
            round(r["eval_loss"], 4) if isinstance(r["eval_loss"], (int, float)) else None,
            (r["scores"] or [""])[0],
            ", ".join(r["deployed_as"]),
            "; ".join(f"{k} {a} → {b}" for k, a, b in r["changed"]),
            r["data_sha256"] or "",
            r["weights_sha256"] or "",
            ANOTHER_BASE if r["another_base"] else "",
        ]
        for r in reversed(found)  # newest first
    ]
    return pd.DataFrame(rows, columns=VERSION_COLUMNS)


def version_choices(studio: Studio) -> list[tuple[str, str]]:
    """(label, ``RUN@vN``) for every kept version of every adapter run, newest run first."""
    out = []
    for run in studio.trained_runs():
        if run.status().method not in ("lora", "qlora"):
            continue
        for v in reversed(run.versions()):
            name = f"{run.status().name} · " if run.status().name else ""
            out.append((f"{name}{run.id}@{v.label} (step {v.record.get('step', '?')})", f"{run.id}@{v.label}"))
    return out


def run_choices(studio: Studio) -> list[tuple[str, str]]:
    return [(f"{r.status().name} · {r.id}" if r.status().name else r.id, r.id) for r in studio.trained_runs()]


# ---- handlers ----------------------------------------------------------------------------------


def _redraw(studio: Studio, tab: RegistryTab, name: str | None, run_id: str | None, status: str) -> dict:
    return {
        tab.deployments: deployments_frame(studio),
        tab.history: history_frame(studio, name),
        tab.version: gr.Dropdown(choices=version_choices(studio)),
        tab.run: gr.Dropdown(choices=run_choices(studio)),
        tab.versions: versions_frame(studio, run_id),
        tab.status: status,
    }


def set_deployment(studio: Studio, tab: RegistryTab, data: dict) -> dict:
    name, ref = (data[tab.name] or "").strip(), data[tab.version]
    if not name or not ref:
        return _redraw(studio, tab, name, data[tab.run], "Type a deployment name and pick a version first.")
    before = studio.deployments.get(name)
    try:
        d = studio.deploy(name, ref, data[tab.why] or "")
    except DeploymentError as exc:
        return _redraw(studio, tab, name, data[tab.run], f"**Can't deploy.** {exc}")
    was = f" (was `{before.ref}`)" if before else ""
    return _redraw(studio, tab, name, data[tab.run], f"`{d.name}` now serves `{d.ref}`{was}.")


def roll_back(studio: Studio, tab: RegistryTab, data: dict) -> dict:
    name = (data[tab.name] or "").strip()
    try:
        d = studio.rollback(name, data[tab.why] or "")
    except DeploymentError as exc:
        return _redraw(studio, tab, name, data[tab.run], f"**Can't roll back.** {exc}")
    return _redraw(
        studio, tab, name, data[tab.run], f"`{d.name}` rolled back to `{d.ref}` (from `{d.history[-1]['from']}`)."
    )


def delete_version(studio: Studio, tab: RegistryTab, data: dict) -> dict:
    ref = data[tab.version]
    if not ref:
        return _redraw(studio, tab, data[tab.name], data[tab.run], "Pick the version to delete first.")
    try:
        gone = studio.delete_version(ref)
    except (LookupError, ValueError) as exc:
        return _redraw(studio, tab, data[tab.name], data[tab.run], f"**Can't delete.** {exc}")
    freed = format_bytes(gone.record.get("disk_bytes") or 0)
    out = _redraw(studio, tab, data[tab.name], data[tab.run], f"Deleted `{ref}` ({freed} freed).")
    return out | {tab.version: gr.Dropdown(choices=version_choices(studio), value=None)}


def reevaluate_version(studio: Studio, tab: RegistryTab, data: dict) -> dict:
    """Score the picked version on the base there is now, with its last evaluation's settings."""
    ref = data[tab.version]
    if not ref:
        return _redraw(studio, tab, data[tab.name], data[tab.run], "Pick the version to re-evaluate first.")
    try:
        result = studio.reevaluate(ref)
    except (LookupError, ValueError, ModelError) as exc:
        return _redraw(studio, tab, data[tab.name], data[tab.run], f"**Can't re-evaluate.** {exc}")
    verdicts = " ".join(result.get("verdicts") or [])
    note = f"Re-evaluated `{ref}` on the current base: {headline(result)}. {verdicts}"
    return _redraw(studio, tab, data[tab.name], data[tab.run], note)


def retrain_version(studio: Studio, tab: RegistryTab, data: dict) -> dict:
    """A new run with the picked version's run settings, on the base there is now."""
    ref = data[tab.version]
    if not ref:
        return _redraw(studio, tab, data[tab.name], data[tab.run], "Pick the version whose run to retrain first.")
    try:
        job = studio.retrain(ref.partition("@")[0])
    except (LookupError, ValueError, RuntimeError) as exc:
        return _redraw(studio, tab, data[tab.name], data[tab.run], f"**Can't retrain.** {exc}")
    note = f"Started run `{job.run.id}` with the settings of `{ref.partition('@')[0]}`; the Train tab shows it."
    return _redraw(studio, tab, data[tab.name], data[tab.run], note)


def refreshed(studio: Studio, tab: RegistryTab, data: dict) -> dict:
    return _redraw(studio, tab, data[tab.name], data[tab.run], "")


def show_history(studio: Studio, tab: RegistryTab, name: str | None) -> pd.DataFrame:
    return history_frame(studio, name)


def show_versions(studio: Studio, tab: RegistryTab, run_id: str | None) -> pd.DataFrame:
    return versions_frame(studio, run_id)
