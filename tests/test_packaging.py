"""The package works when installed from a wheel, not only from this checkout: the templates,
sample datasets and css travel inside it and are found through importlib.resources."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parents[1]
DATA = [
    "studio/templates/chatml.jinja",
    "studio/templates/model_card.md",
    "studio/templates/samples/chat.jsonl",
    "studio/templates/samples/instructions.csv",
    "studio/templates/samples/text.csv",
    "studio/ui/studio.css",
    "studio/evaluation/general_prompts.jsonl",
]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """Build a wheel from a copy of the sources (no build/ or egg-info left in the checkout, no
    stale build/lib reused) and install it without dependencies into a folder of its own."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(ROOT / "studio", src / "studio", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "app.py"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
        check=True,
        timeout=180,
        capture_output=True,
    )
    wheel = next((tmp / "dist").glob("finetune_studio-*.whl"))
    site = tmp / "site"
    subprocess.run(
        [*pip, "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        timeout=180,
        capture_output=True,
    )
    elsewhere = tmp / "elsewhere"  # the working directory: nothing of the checkout importable from it
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    return {"wheel": wheel, "site": site, "cwd": elsewhere, "env": env}


def _python(installed: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=installed["cwd"],
        env=installed["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_wheel_holds_package_data_and_declares_dependencies(installed):
    with zipfile.ZipFile(installed["wheel"]) as zf:
        names = set(zf.namelist())
        meta = next(zf.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert set(DATA) <= names
    assert {"studio/__main__.py", "studio/ui/server.py"} <= names
    assert not any("/" not in n and n.endswith(".py") for n in names)  # no top-level module such as `app`
    requires = [line.split(": ", 1)[1] for line in meta.splitlines() if line.startswith("Requires-Dist: ")]
    for dist in ("torch", "transformers", "peft", "gradio", "pandas", "gguf", "plotly", "pyarrow"):
        assert any(r.startswith(dist + ">=") for r in requires), (dist, requires)
    assert not any(r.startswith(("trl", "datasets")) for r in requires)  # benchmarks only
    assert any(r.startswith("bitsandbytes") and 'extra == "qlora"' in r for r in requires)


def test_installed_package_finds_its_data(installed):
    script = """
import json
import studio
from studio.export.model_card import CARD_TEMPLATE
from studio.models import CHATML_TEMPLATE
from studio.service import Studio
from studio.ui.app import CSS, build_app, launch_kwargs
from studio.ui.data_tab import SAMPLE_FILES, SAMPLES

service = Studio("runs")
build_app(service)
print(json.dumps({"studio": studio.__file__, "css": str(CSS), "css_chars": len(launch_kwargs(service)["css"]),
                  "chatml": str(CHATML_TEMPLATE), "card": str(CARD_TEMPLATE),
                  "samples": [str(SAMPLES / name) for name in SAMPLE_FILES.values()]}))
"""
    proc = _python(installed, "-c", script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    site = installed["site"]
    assert Path(found["studio"]).is_relative_to(site), found["studio"]
    assert found["css_chars"] > 100
    for key in ("css", "chatml", "card", *range(len(found["samples"]))):
        path = Path(found[key] if isinstance(key, str) else found["samples"][key])
        assert path.is_relative_to(site) and path.is_file(), path


def test_installed_cli_runs_from_anywhere(installed):
    for module in ("studio.cli", "studio"):  # `python -m studio ui` is `finetune-studio ui`
        proc = _python(installed, "-m", module, "--help", timeout=60)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "validate" in proc.stdout and "prepare-model" in proc.stdout
    sample = installed["site"] / "studio" / "templates" / "samples" / "instructions.csv"
    proc = _python(installed, "-m", "studio.cli", "validate", str(sample))  # the prepared default model
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "300 rows, 300 usable" in proc.stdout and "OK: training can proceed." in proc.stdout


def test_installed_package_serves_the_page(installed, tmp_path):
    """`python -m studio ui` from the wheel, outside the checkout: the page and its css answer."""
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "studio", "ui", "--port", str(port), "--runs-dir", str(tmp_path / "runs")],
        cwd=installed["cwd"],
        env=installed["env"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline, page = time.monotonic() + 120, None
        while page is None:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (
                "no answer within 120 s:\n" + (tmp_path / "server.log").read_text()[-3000:]
            )
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
            except OSError:
                time.sleep(0.5)
        assert "Finetune Studio" in page
        config = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=10).read())
        assert ".fs-progress" in (config.get("css") or "")  # the packaged css is served
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
