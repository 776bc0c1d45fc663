"""Export zips and the command line: the same journey as the page, without a browser."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from studio.cli import build_parser, main
from studio.config import RunConfig, command_for
from studio.export.zips import ExportError, export_zip
from studio.runs.registry import RunRegistry

ROOT = Path(__file__).resolve().parents[1]


def _train(tiny_model_dir, data, runs_dir, *extra):
    return main(
        [
            "train",
            "--data",
            str(data),
            "--model",
            str(tiny_model_dir),
            "--runs-dir",
            str(runs_dir),
            "--max-steps",
            "4",
            "--learning-rate",
            "0.01",
            "--max-length",
            "64",
            *extra,
        ]
    )


def test_cli_train_then_export(tiny_model_dir, instruction_csv, runs_dir, tmp_path, capsys):
    assert (
        _train(
            tiny_model_dir,
            instruction_csv,
            runs_dir,
            "--lora-r",
            "4",
            "--lora-targets",
            "q_proj,v_proj",
            "--seed",
            "3",
            "--eval-fraction",
            "0.2",
            "--save-steps",
            "2",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "Run folder:" in out and "step 4/4" in out and "Finished 4 steps" in out
    run = RunRegistry(runs_dir).list()[0]
    cfg = run.config()
    assert (cfg.lora.r, cfg.lora.targets, cfg.training.seed, cfg.data.eval_fraction) == (4, "q_proj,v_proj", 3, 0.2)
    assert (run.path / "checkpoints" / "step-2").is_dir()

    zpath = tmp_path / "adapter.zip"
    assert main(["export", run.id, "--runs-dir", str(runs_dir), "--out", str(zpath)]) == 0
    zf = zipfile.ZipFile(zpath)
    names = set(zf.namelist())
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "config.yaml",
        "metrics.csv",
        "README.md",
    } <= names
    assert len(names) == len(zf.namelist())  # no duplicate entries
    card = zf.read("README.md").decode()
    for expected in ("lora", "PeftModel.from_pretrained", "`lora.r` | 4", "Final training loss", instruction_csv.name):
        assert expected in card, expected
    assert yaml.safe_load(zf.read("config.yaml"))["lora"]["r"] == 4
    # The run folder path works as RUN too.
    assert main(["export", str(run.path), "--out", str(tmp_path / "b.zip")]) == 0


def test_cli_merged_export_and_import(tiny_model_dir, instruction_csv, runs_dir, tmp_path, capsys):
    assert _train(tiny_model_dir, instruction_csv, runs_dir, "--lora-r", "4") == 0
    run = RunRegistry(runs_dir).list()[0]
    merged, adapter = tmp_path / "merged.zip", tmp_path / "adapter.zip"
    assert main(["export", run.id, "--runs-dir", str(runs_dir), "--merged", "--out", str(merged)]) == 0
    assert {"config.json", "model.safetensors", "README.md"} <= set(zipfile.ZipFile(merged).namelist())
    assert main(["export", run.id, "--runs-dir", str(runs_dir), "--out", str(adapter)]) == 0
    capsys.readouterr()

    other = tmp_path / "other-runs"
    assert main(["import", str(adapter), "--name", "shared copy", "--runs-dir", str(other)]) == 0
    out = capsys.readouterr().out
    assert "Imported" in out and "shared-copy-imported" in out
    assert [r.name for r in RunRegistry(other).trained()] == ["shared copy"]

    # Errors are sentences on stderr with a non-zero exit, never tracebacks.
    junk = tmp_path / "junk.zip"
    junk.write_text("not a zip")
    for argv in (
        ["import", str(junk)],
        ["import", str(adapter), "--max-size-mb", "0.01"],
        ["export", "nope", "--merged"],
    ):
        assert main([*argv, "--runs-dir", str(other)]) == 1
        err = capsys.readouterr().err
        assert err.strip().endswith(".") and "Traceback" not in err, err
    assert len(RunRegistry(other).list()) == 1


def test_yaml_config_with_flag_overrides(tiny_model_dir, instruction_csv, runs_dir, tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(
        yaml.safe_dump({"method": "lora", "lora": {"r": 2, "alpha": 8}, "training": {"max_steps": 99, "batch_size": 2}})
    )
    assert _train(tiny_model_dir, instruction_csv, runs_dir, "--config", str(cfg_file)) == 0
    cfg = RunRegistry(runs_dir).list()[0].config()
    assert (cfg.lora.r, cfg.lora.alpha, cfg.training.batch_size) == (2, 8, 2)  # from the YAML
    assert cfg.training.max_steps == 4  # the flag wins


@pytest.mark.unit
def test_bad_config_prints_every_problem(tmp_path, capsys):
    assert (
        main(["train", "--data", str(tmp_path / "none.csv"), "--learning-rate", "5", "--runs-dir", str(tmp_path / "r")])
        == 2
    )
    err = capsys.readouterr().err
    assert "`data.path`" in err and "`training.learning_rate`" in err
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


@pytest.mark.unit
def test_export_refuses_unfinished_runs(runs_dir, capsys):
    run = RunRegistry(runs_dir).create(RunConfig())
    with pytest.raises(ExportError, match="no finished"):
        export_zip(run)
    assert main(["export", "missing-run", "--runs-dir", str(runs_dir)]) == 1
    assert "No run called" in capsys.readouterr().err


@pytest.mark.unit
def test_every_config_field_has_a_flag_and_copy_as_cli_round_trips(tmp_path):
    cfg = RunConfig.from_dict(
        {
            "method": "qlora",
            "data": {"path": "my data.csv", "max_length": 256},
            "lora": {"targets": "q_proj,v_proj"},
            "training": {"epochs": 2.0},
        }
    )
    cmd = command_for(cfg)
    assert "--method qlora" in cmd and "--max-length 256" in cmd and "'my data.csv'" in cmd
    import shlex

    args = build_parser().parse_args(shlex.split(cmd)[1:])
    overrides = {k: v for k, v in vars(args).items() if "." in k or k in ("model", "method", "trust_remote_code")}
    assert RunConfig().with_overrides(overrides) == cfg

    from studio.config import launch_command_for

    multi = shlex.split(launch_command_for(cfg, 4))
    assert multi[:7] == ["accelerate", "launch", "--multi_gpu", "--num_processes", "4", "-m", "studio.cli"]
    assert multi[7:] == shlex.split(cmd)[1:]  # the same flags after `train`


@pytest.mark.process
def test_core_never_imports_gradio():
    code = (
        "import sys, studio.service, studio.cli, studio.export.zips, studio.export.adapter_import, "
        "studio.export.model_card, studio.inference.playground, studio.training; "
        "print('gradio' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True, timeout=120
    )
    assert out.stdout.strip() == "False"


@pytest.mark.process
def test_public_bind_requires_auth():
    from studio.launch import resolve_auth

    assert resolve_auth("127.0.0.1", None) is None
    assert resolve_auth("0.0.0.0", "ann:secret") == ("ann", "secret")
    with pytest.raises(SystemExit, match="without a password"):
        resolve_auth("0.0.0.0", None)
    with pytest.raises(SystemExit, match="user:password"):
        resolve_auth("127.0.0.1", "nocolon")
    for cmd in (["app.py"], ["-m", "studio.cli", "ui"]):  # finetune-studio ui is the same server
        proc = subprocess.run(
            [sys.executable, *cmd, "--host", "0.0.0.0", "--port", "1"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            env={"PATH": "/usr/bin:/bin"},
        )
        assert proc.returncode != 0 and "without a password" in proc.stderr, proc.stderr


@pytest.mark.unit
def test_pickle_weights_are_refused(tiny_model_dir, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    from studio.models import ModelError, load_model

    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder)
    torch.save(load_file(tiny_model_dir / "model.safetensors"), folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="no safetensors weights"):
        load_model(str(folder))


@pytest.mark.unit
def test_unknown_hub_model_offline_fails_fast_with_a_sentence(monkeypatch):
    """huggingface_hub alone retries for ~49 s offline; the studio answers at once."""
    import socket
    import time

    from studio import models

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_REACHABLE", {})
    monkeypatch.setattr(socket, "create_connection", unreachable)
    start = time.monotonic()
    with pytest.raises(models.ModelError, match="cannot be reached"):
        models.resolve("some-org/not-a-cached-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelError, match="not in the local Hugging Face cache"):
        models.load_tokenizer("some-org/not-a-cached-model")
    assert time.monotonic() - start < 5
