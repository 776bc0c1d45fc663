"""Helpers shared by the tests (fixtures live in conftest.py): waits with deadlines, the tiny
model's run config, CSV writing, and a served app with pages that record their errors."""

from __future__ import annotations

import csv
import os
import socket
import time
from pathlib import Path

import pytest

SAMPLE = Path(__file__).resolve().parents[1] / "studio" / "templates" / "samples" / "instructions.csv"
SCREENSHOTS = os.environ.get("FS_SCREENSHOTS")  # set to a folder to refresh the screenshots (assets/)


def wait_until(condition, timeout: float, what: str, poll: float = 0.02):
    """Poll ``condition`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def tiny_run_config(model_dir, data, method: str = "lora", dropout: float = 0.0, max_steps: int = 30, **training):
    """A checked RunConfig for the tiny model: short rows, small LoRA, a learning rate that moves it fast."""
    from studio.config import RunConfig

    return RunConfig.from_dict(
        {
            "model": str(model_dir),
            "method": method,
            "data": {"path": str(data), "max_length": 64, "eval_fraction": 0.1},
            "lora": {"r": 8, "alpha": 16, "dropout": dropout},
            "training": {"max_steps": max_steps, "learning_rate": 1e-2, "batch_size": 4, **training},
        }
    ).check()


def two_sum_adapters(model_dir, root: Path) -> list:
    """Two fp32 LoRA runs (different seeds and learning rates) on a tiny sums dataset under
    ``root/runs``: served tests compare a row in a batch with the same request alone, an exact
    promise in fp32."""
    from studio.runs.registry import RunRegistry
    from studio.training import run_training

    rows = [[f"what is {a} plus {b}", f"answer {a + b} why {a} plus {b}"] for a in range(1, 7) for b in range(1, 7)]
    data = write_csv(root / "sums.csv", ["instruction", "output"], rows)
    registry = RunRegistry(root / "runs")
    runs = []
    for seed, lr in ((1, 1e-2), (2, 3e-2)):
        cfg = tiny_run_config(
            model_dir, data, max_steps=12, memory_check=False, seed=seed, learning_rate=lr, precision="fp32"
        )
        run = registry.create(cfg)
        assert run_training(cfg, run).state == "finished"
        runs.append(run)
    return runs


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def add_version(run, src: Path, kind: str = "trained"):
    """Give ``run`` a new version holding the adapter files in ``src``, as a finished save does:
    the weights through a temp folder renamed into versions/vN, then the lineage. Returns it."""
    import shutil

    number, folder = run.next_version_dir()
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("version.json", "scores.json"))
    tmp.rename(folder)
    return run.commit_version(number, kind)


def write_fingerprint(run, fp: dict) -> None:
    """Write a run's base fingerprint as if it had trained on that base: the run's and each
    version's own copy (a version keeps the base it was trained on)."""
    from studio.runs import fingerprint

    fingerprint.write(run.path, fp)
    for v in run.versions():
        fingerprint.write(v.path, fp)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(studio, **api):
    """Launch the app for ``studio`` on a free local port, after the server's own preload
    (studio/ui/server.py); returns (url, demo). ``api``: serving_context's options (``model``:
    the base /v1 serves)."""
    from studio.inference.warmup import preload
    from studio.serving.server import serving_context
    from studio.ui.app import build_app, launch_kwargs

    preload()
    serving_context(studio, **api)  # the page's server also serves the API, as `finetune-studio ui` does
    demo = build_app(studio)
    port = free_port()
    demo.queue().launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_kwargs(studio)
    )
    return f"http://127.0.0.1:{port}", demo


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("#data-upload", timeout=60_000)  # hydration, not the load event
    return page, errors


def screenshot(page, name):
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"), full_page=True)
