"""What a newcomer can get wrong at start-up gets one sentence and a non-zero exit, never a
traceback: a busy port, a runs folder that cannot be created or written, a model that does not
exist. And the server imports what its handlers import lazily before it serves (studio/inference/warmup.py)."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from studio.cli import main
from studio.runs.registry import RunRegistry, RunsFolderError

ROOT = Path(__file__).resolve().parents[1]
UNKNOWN_MODEL = "nosuch/model"


def _app(*args: str) -> subprocess.CompletedProcess:
    """`python app.py ARGS` as a newcomer runs it; these refusals come before the slow imports."""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "app.py"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def _refused(proc: subprocess.CompletedProcess) -> str:
    """The one sentence a refused start printed; it exited non-zero without a traceback or a server."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert "Running on" not in proc.stdout
    return proc.stderr.strip()


@pytest.fixture
def busy_port():
    """A port another program is listening on (what a second `make run` finds)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.process
def test_busy_port_is_named_with_the_fix(busy_port, tmp_path):
    message = _refused(_app("--port", str(busy_port), "--runs-dir", str(tmp_path / "runs")))
    assert message == (
        f"Port {busy_port} is already in use on 127.0.0.1: is Finetune Studio (or another program) "
        f"already running there? Open http://127.0.0.1:{busy_port}, stop that program, or start on "
        f"another port, e.g. --port {busy_port + 1}."
    )
    assert not (tmp_path / "runs").exists()  # refused before touching anything


def test_busy_port_through_the_cli(busy_port, tmp_path):
    with pytest.raises(SystemExit) as exc:  # the entry point prints it and exits 1
        main(["ui", "--port", str(busy_port), "--runs-dir", str(tmp_path / "runs")])
    assert f"Port {busy_port} is already in use" in str(exc.value.code)


@pytest.mark.process
@pytest.mark.parametrize("port", ["0", "70000"])
def test_port_out_of_range(port, tmp_path):
    assert "--port must be between 1 and 65535" in _refused(_app("--port", port, "--runs-dir", str(tmp_path)))


def _uncreatable(tmp_path: Path) -> Path:
    """A folder nobody can create, root included (root ignores chmod): one under a file."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    return blocker / "runs"


@pytest.mark.process
def test_runs_folder_that_cannot_be_created(tmp_path):
    runs = _uncreatable(tmp_path)
    message = _refused(_app("--runs-dir", str(runs)))
    assert message == (
        f"The runs folder {runs} cannot be created (Not a directory). Pick a folder you can write "
        "to with --runs-dir DIR (or set $FINETUNE_STUDIO_RUNS_DIR)."
    )


@pytest.mark.process
@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc: a folder even root cannot write")
def test_runs_folder_that_cannot_be_written():
    assert "The runs folder /proc cannot be written to" in _refused(_app("--runs-dir", "/proc"))


@pytest.mark.unit
@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into a chmod 555 folder anyway")
def test_read_only_runs_folder(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir(mode=0o555)
    with pytest.raises(RunsFolderError, match="cannot be written to"):
        RunRegistry(runs).check_writable()


@pytest.mark.unit
def test_cli_train_with_a_runs_folder_it_cannot_use(tiny_model_dir, instruction_csv, tmp_path, capsys):
    common = ["train", "--data", str(instruction_csv), "--model", str(tiny_model_dir), "--max-steps", "1"]
    assert main([*common, "--runs-dir", str(_uncreatable(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "cannot be created (Not a directory)" in err and "--runs-dir" in err
    if Path("/proc/self").is_dir():  # exists, but no run folder can be made in it
        assert main([*common, "--runs-dir", "/proc"]) == 2
        assert "The runs folder /proc cannot be written to" in capsys.readouterr().err


def _offline_message(ref: str) -> str:
    return f"The model {ref!r} is not in the local Hugging Face cache and the hub cannot be reached (offline)."


@pytest.mark.unit
def test_cli_validate_unknown_model(instruction_csv, capsys):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: tests never reach the network
    assert main(["validate", str(instruction_csv), "--model", UNKNOWN_MODEL]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"Error: {_offline_message(UNKNOWN_MODEL)}") and "Use `default`" in err


@pytest.mark.unit
def test_cli_train_unknown_model(instruction_csv, runs_dir, capsys):
    assert (
        main(
            [
                "train",
                "--data",
                str(instruction_csv),
                "--model",
                UNKNOWN_MODEL,
                "--runs-dir",
                str(runs_dir),
                "--max-steps",
                "1",
            ]
        )
        == 2
    )
    out, err = capsys.readouterr()
    assert _offline_message(UNKNOWN_MODEL) in err and "Traceback" not in out + err
    assert not list(runs_dir.iterdir())  # refused before a run folder was made for it


@pytest.mark.unit
def test_unknown_model_in_the_model_box(instruction_csv, runs_dir):
    """What the page's handlers call when the model box names a model that does not exist: the
    Data tab's report and the Train tab's memory plan both show the model's sentence."""
    from studio.config import RunConfig
    from studio.models import ModelError
    from studio.service import Studio

    studio = Studio(runs_dir)
    with pytest.raises(ModelError, match=r"not in the local Hugging Face cache"):
        studio.inspect_dataset(instruction_csv, model=UNKNOWN_MODEL)
    with pytest.raises(ModelError, match=r"not in the local Hugging Face cache"):
        studio.memory_plan(RunConfig.from_dict({"model": UNKNOWN_MODEL}))
    with pytest.raises(ModelError, match=r"does not exist; check the path"):
        studio.memory_plan(RunConfig.from_dict({"model": "./no/such/folder"}))


def _lazy_imports() -> list[tuple[str, str, tuple[str, ...]]]:
    """(file, module, names) for every import inside a function in studio/, entry points aside
    (they import on the main thread before anything is served)."""
    found = []
    for path in sorted((ROOT / "studio").rglob("*.py")):
        entry_points = ("studio/ui/server.py", "studio/serving/server.py", "studio/launch.py")
        if path.name in ("cli.py", "warmup.py") or path.relative_to(ROOT).as_posix() in entry_points:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = tuple(a.name for a in node.names)
                    package = ROOT.joinpath(*node.module.split("."))
                    # from studio.planning import hardware: the modules are what gets imported
                    if node.module.startswith("studio") and all((package / f"{n}.py").exists() for n in names):
                        found += [(path.name, f"{node.module}.{n}", ()) for n in names]
                    else:
                        found.append((path.name, node.module, names))
                elif isinstance(node, ast.Import):
                    found += [(path.name, a.name, ()) for a in node.names]
    return found


@pytest.mark.unit
def test_preload_covers_every_lazy_import():
    """Handlers must not be the first to import transformers, peft or a studio module: keep
    studio/inference/warmup.py's list in step with the imports inside functions."""
    from studio.inference.warmup import PRELOAD

    missing = []
    for file, module, names in _lazy_imports():
        if module.split(".")[0] not in ("transformers", "peft", "studio") and not module.startswith("torch._"):
            continue  # the standard library, and torch's public modules (imported with torch)
        library = not module.startswith("studio")  # a studio module's names come with it
        if module not in PRELOAD or (library and not set(names) <= set(PRELOAD[module])):
            missing.append(f"{file}: from {module} import {', '.join(names)}")
    assert not missing, "add these to studio/inference/warmup.py PRELOAD:\n" + "\n".join(missing)


@pytest.mark.unit
def test_preload_imports_what_it_lists():
    from studio.inference.warmup import PRELOAD, preload

    preload()
    for module, names in PRELOAD.items():
        assert module in sys.modules
        assert all(hasattr(sys.modules[module], n) for n in names)
