"""Adapter zip, merged export and adapter import on the tiny model: contents, logits, hostile zips."""

from __future__ import annotations

import json
import shutil
import stat
import zipfile
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch
from safetensors.torch import load_file

from studio.export.adapter_import import AdapterImportError, import_adapter_zip
from studio.export.zips import artifact_name, export_merged, export_zip, zip_contents
from studio.runs.registry import Run, RunRegistry
from studio.training import run_training
from tests.helpers import tiny_run_config, write_csv


def _rows(n: int = 40) -> list[list[str]]:
    return [
        [f"what is {a} plus {b}", f"answer {a + b} why {a} plus {b} equals {a + b}"]
        for a in range(1, 9)
        for b in range(1, 6)
    ][:n]


def _train(root: Path, model_dir: Path, method: str = "lora", steps: int = 6, **training):
    data = write_csv(root / f"train-{method}.csv", ["instruction", "output"], _rows())
    registry = RunRegistry(root / f"runs-{method}")
    cfg = tiny_run_config(model_dir, data, method, max_steps=steps, memory_check=False, **training)
    run = registry.create(cfg)
    assert run_training(cfg, run).state == "finished"
    return registry, run


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    return _train(tmp_path_factory.mktemp("export"), tiny_model_dir)


@pytest.fixture(scope="module")
def adapter_zip(trained, tmp_path_factory):
    return export_zip(trained[1], tmp_path_factory.mktemp("zips") / "good.zip")


def _logits(model, text_ids):
    with torch.no_grad():
        return model(text_ids).logits


def _probe(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return torch.tensor([tok("what is 3 plus 4 answer 7 why")["input_ids"]])


def _peft(model_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


# ---- adapter zip ---------------------------------------------------------------------------------


def test_adapter_zip_holds_weights_card_curve_and_fingerprint(trained, tiny_model_dir, tmp_path):
    _, run = trained
    path = export_zip(run)
    assert path.name == f"{run.id}-v1-adapter.zip" == artifact_name(run, "adapter")
    assert not list(run.path.glob(".*.tmp"))  # built under a temp name, renamed when complete
    names = [n for n, _ in zip_contents(path)]
    assert len(names) == len(set(names))
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "config.yaml",
        "metrics.csv",
        "fingerprint.json",
        "run.json",
        "loss_curve.svg",
        "README.md",
    } <= set(names)
    zf = zipfile.ZipFile(path)
    status = run.status()
    card = zf.read("README.md").decode()
    for expected in (
        "library_name: peft",
        f"`{tiny_model_dir}`",
        "LoRA (rank 8, alpha 16",
        status.data_sha256,
        "train-lora.csv",
        "| Base model |",
        "| With the adapter |",
        "perplexity",
        f"{status.base_eval_loss:.4f}",
        f"{status.eval_loss:.4f}",
        "`lora.r` | 8",
        "PeftModel.from_pretrained",
        "--enable-lora",
        "--lora-modules",
        "LoRARequest",
        "max_lora_rank=8",
        "![Training loss](loss_curve.svg)",
    ):
        assert expected in card, expected
    svg = ElementTree.fromstring(zf.read("loss_curve.svg"))
    assert svg.tag.endswith("svg") and svg.find("{http://www.w3.org/2000/svg}polyline") is not None
    assert json.loads(zf.read("fingerprint.json")) == run.fingerprint()
    assert json.loads(zf.read("run.json"))["run_id"] == run.id
    assert json.loads(zf.read("adapter_config.json"))["base_model_name_or_path"] == str(tiny_model_dir)

    # The unzipped folder loads in plain PEFT and gives the run's own adapter's logits.
    out = tmp_path / "unzipped"
    zf.extractall(out)
    ids = _probe(tiny_model_dir)
    assert torch.equal(_logits(_peft(tiny_model_dir, out), ids), _logits(_peft(tiny_model_dir, run.weights_dir()), ids))

    # The zip carries the version's lineage, without this machine's paths.
    lineage = json.loads(zf.read("lineage.json"))
    assert lineage["version"] == 1 and lineage["parent"] is None and lineage["kind"] == "trained"
    assert lineage["data"]["sha256"] == run.status().data_sha256 and lineage["data"]["train_rows"]
    data_path = run.config().data.path
    assert data_path not in json.dumps(lineage) and lineage["config"]["data"]["path"] == Path(data_path).name
    assert "version.json" not in zf.namelist()

    # A new version gets a new file name; the old one stays exportable as it was.
    from tests.helpers import add_version

    clone = Run(shutil.copytree(run.path, tmp_path / "clone" / run.id))
    v1_step, v1_loss = run.status().step, run.status().final_loss
    clone.set_status("finished", step=v1_step + 6, final_loss=0.25)  # as a continuation would leave it
    clone.config_path.write_text(clone.config().with_overrides({"training.max_steps": v1_step + 6}).to_yaml())
    add_version(clone, clone.weights_dir(), kind="continued")
    assert export_zip(clone).name == f"{run.id}-v2-adapter.zip"
    with zipfile.ZipFile(export_zip(clone.at_version(1), tmp_path / "v1.zip")) as old:  # v1 describes v1
        assert json.loads(old.read("lineage.json"))["version"] == 1
        carried = json.loads(old.read("run.json"))
        assert (carried["version"], carried["step"], carried["final_loss"]) == (1, v1_step, v1_loss)
        assert f"max_steps: {v1_step}\n" in old.read("config.yaml").decode()
        assert len(old.read("metrics.csv").decode().splitlines()) == len(run.metrics()) + 1
    with zipfile.ZipFile(clone.path / f"{run.id}-v2-adapter.zip") as new:
        assert json.loads(new.read("lineage.json"))["parent"] == 1
        card = new.read("README.md").decode()
    assert "| Version | v2: continued from v1 |" in card
    assert f"| Settings changed since v1 | `training.max_steps` {v1_step} → {v1_step + 6} |" in card


# ---- merged --------------------------------------------------------------------------------------


def test_merged_model_logits_match_the_adapted_model(trained, tiny_model_dir, tmp_path):
    """Tolerance: max |logit difference| < 1e-4 in float32 (measured here: a few 1e-6)."""
    from transformers import AutoModelForCausalLM

    _, run = trained
    path = export_merged(run)
    assert path.name == f"{run.id}-v1-merged.zip"
    assert not list(run.path.glob(".merge-*")) and not list(run.path.glob(".*.tmp"))
    names = {n for n, _ in zip_contents(path)}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "README.md",
        "config.yaml",
        "metrics.csv",
        "loss_curve.svg",
    } <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors"}
    zipfile.ZipFile(path).extractall(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", use_safetensors=True).eval()
    ids = _probe(tiny_model_dir)
    adapted = _logits(_peft(tiny_model_dir, run.weights_dir()), ids)
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), ids)
    diff = (_logits(merged, ids) - adapted).abs().max().item()
    assert diff < 1e-4, diff
    assert (base - adapted).abs().max().item() > 1e-2  # the adapter does change the model
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "library_name: transformers" in card and "Merge check" in card and "QLoRA caveat" not in card
    # Built once per version: asking again reuses the zip.
    mtime = path.stat().st_mtime_ns
    assert export_merged(run) == path and path.stat().st_mtime_ns == mtime


def test_qlora_merges_onto_the_full_precision_base_with_the_caveat(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    _, run = _train(tmp_path, tiny_model_dir, "qlora", steps=4)
    path = export_merged(run)
    zipfile.ZipFile(path).extractall(tmp_path / "merged")
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "QLoRA caveat" in card and "NF4" in card and "de-quantized" in card
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = _probe(tiny_model_dir)
    # Exact against the full-precision base + adapter; only close to the 4-bit adapted model.
    assert (_logits(merged, ids) - _logits(_peft(tiny_model_dir, run.weights_dir()), ids)).abs().max() < 1e-4


def test_full_fine_tuning_exports_the_model_itself(tiny_model_dir, tmp_path):
    _, run = _train(tmp_path, tiny_model_dir, "full", steps=2)
    names = {n for n, _ in zip_contents(export_merged(run))}
    assert {"config.json", "model.safetensors", "README.md"} <= names and "adapter_config.json" not in names
    assert export_zip(run).name == f"{run.id}-v1-model.zip"


# ---- import --------------------------------------------------------------------------------------


def _entries(registry: RunRegistry) -> set[str]:
    return {p.name for p in registry.root.iterdir()}


def test_import_round_trip_keeps_weights_and_metadata(trained, adapter_zip, tmp_path):
    source_registry, source = trained
    registry = RunRegistry(tmp_path / "other")
    run = import_adapter_zip(adapter_zip, registry)
    assert run.id == f"{source.id}-imported" and run.name == source.id
    assert [r.id for r in registry.trained()] == [run.id]  # so the Chat and Export tabs list it
    status = run.status()
    assert status.imported is True and status.version == 1 and status.message == "Imported from good.zip."
    for key in ("data_sha256", "final_loss", "eval_loss", "base_eval_loss", "train_rows", "step"):
        assert getattr(status, key) == getattr(source.status(), key), key
    assert run.config().model == source.config().model and run.config().data.path == ""
    assert run.config().lora.r == 8 and run.fingerprint() == source.fingerprint()
    assert len(run.train_metrics()) == len(source.train_metrics())
    original = load_file(source.weights_dir() / "adapter_model.safetensors")
    imported = load_file(run.weights_dir() / "adapter_model.safetensors")
    assert original.keys() == imported.keys() and all(torch.equal(original[k], imported[k]) for k in original)

    # The imported run exports again, and that zip imports again with the same weights.
    again = export_zip(run, tmp_path / "again.zip")
    second = import_adapter_zip(again, registry)
    assert second.id == f"{source.id}-imported-2" and second.name == source.id
    assert import_adapter_zip(again, registry, name="my copy!").id == "my-copy-imported"
    assert torch.equal(
        load_file(second.weights_dir() / "adapter_model.safetensors")[next(iter(original))],
        original[next(iter(original))],
    )
    assert "imported adapter" in zipfile.ZipFile(again).read("README.md").decode()
    assert not [n for n in _entries(registry) if n.startswith(".")]


def test_imported_run_chats_like_its_source(trained, adapter_zip, tmp_path):
    """The Chat tab's playground takes an imported run: same greedy reply as the run it came from."""
    from studio.inference.playground import Playground, SamplingSettings

    _, source = trained
    imported = import_adapter_zip(adapter_zip, RunRegistry(tmp_path / "runs"))
    # It computes as its source did: bf16 on a CPU with AVX512-BF16 (greedy text differs from fp32's).
    assert imported.status().precision == source.status().precision in ("bf16", "fp32")
    playground = Playground("cpu")
    settings = SamplingSettings(max_new_tokens=8)
    messages = [{"role": "user", "content": "what is 3 plus 4"}]
    replies = []
    for run in (source, imported):
        assert playground.activate(run) == []
        replies.append(list(playground.stream_pair(messages, messages, settings))[-1])
    assert replies[0] == replies[1] and replies[0][0] != replies[0][1]


def _rezip(src: Path, dst: Path, drop=(), add=None, edit=None) -> Path:
    """A copy of ``src`` without ``drop``, with ``add`` (name -> bytes or ZipInfo, bytes) and
    ``edit`` (name -> function of the bytes)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if info.filename in drop:
                continue
            data = zin.read(info)
            if edit and info.filename in edit:
                data = edit[info.filename](data)
            zout.writestr(info.filename, data)
        for name, data in (add or {}).items():
            if isinstance(data, tuple):
                zout.writestr(*data)
            else:
                zout.writestr(name, data)
    return dst


def _json_edit(**changes):
    def edit(data: bytes) -> bytes:
        obj = json.loads(data)
        obj.update(changes)
        return json.dumps(obj).encode()

    return edit


def _symlink() -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo("tokenizer_extra.json")
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, b"/etc/passwd"


@pytest.fixture(scope="module")
def other_base(tiny_model_dir, tmp_path_factory):
    """A second tiny Llama with hidden size 32 and the same tokenizer: the wrong base."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("other-base")
    for f in tiny_model_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy(f, out)
    cfg = LlamaConfig.from_pretrained(tiny_model_dir)
    cfg.hidden_size, cfg.intermediate_size = 32, 64
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


HOSTILE = {
    "parent": (dict(add={"../evil.json": b"{}"}), "could write outside"),
    "absolute": (dict(add={"/tmp/evil.json": b"{}"}), "absolute path"),
    "drive": (dict(add={"C:/evil.json": b"{}"}), "absolute path"),
    "backslash": (dict(add={"..\\evil.json": b"{}"}), "backslash"),
    "symlink": (dict(add={"link": _symlink()}), "link or special file"),
    "pickle": (dict(drop=("adapter_model.safetensors",), add={"adapter_model.bin": b"x"}), "Convert the adapter"),
    "extra-pickle": (dict(add={"training_args.bin": b"x"}), "safetensors only"),
    "no-config": (dict(drop=("adapter_config.json",)), "no adapter_config.json"),
    "no-weights": (dict(drop=("adapter_model.safetensors",)), "no adapter_model.safetensors"),
    "not-lora": (dict(edit={"adapter_config.json": _json_edit(peft_type="PREFIX_TUNING")}), "LoRA adapters"),
    "bad-json": (dict(edit={"adapter_config.json": lambda b: b"{nope"}), "not a JSON object"),
    "bomb": (dict(add={"vocab.txt": b"\0" * (8 * 2**20)}), "zip bomb"),
    "garbage-weights": (dict(edit={"adapter_model.safetensors": lambda b: b"\xff" * 64}), "not a valid safetensors"),
    "duplicate": (dict(add={"tokenizer.json": b"{}"}), "twice"),
    "fingerprint": (
        dict(edit={"fingerprint.json": _json_edit(hidden_size=128, num_hidden_layers=7)}),
        "hidden_size 128 vs 64",
    ),
    "missing-base": (
        dict(
            drop=("config.yaml", "fingerprint.json"),
            edit={"adapter_config.json": _json_edit(base_model_name_or_path="some-org/not-here")},
        ),
        "`some-org/not-here`, which is not available on this machine",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_or_broken_zips_are_refused_and_leave_nothing(case, adapter_zip, tmp_path):
    import warnings

    kwargs, message = HOSTILE[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name on purpose
        bad = _rezip(adapter_zip, tmp_path / f"{case}.zip", **kwargs)
    registry = RunRegistry(tmp_path / "runs")
    before = _entries(registry)
    with pytest.raises(AdapterImportError, match=message.replace("(", r"\(").replace(")", r"\)")):
        import_adapter_zip(bad, registry)
    assert _entries(registry) == before and registry.list() == []
    assert not (tmp_path / "evil.json").exists()


def test_adapter_for_another_base_is_refused_by_its_shapes(adapter_zip, other_base, tmp_path):
    """No fingerprint or config.yaml (a plain PEFT zip): the layer widths still give it away."""
    bad = _rezip(
        adapter_zip,
        tmp_path / "plain.zip",
        drop=("config.yaml", "fingerprint.json", "run.json"),
        edit={"adapter_config.json": _json_edit(base_model_name_or_path=str(other_base))},
    )
    registry = RunRegistry(tmp_path / "runs")
    with pytest.raises(AdapterImportError, match=r"width (64|128), but the base .* has (32|64): it was trained on"):
        import_adapter_zip(bad, registry)
    assert _entries(registry) == set()


def test_size_cap_not_a_zip_and_plain_peft_folder(adapter_zip, tiny_model_dir, tmp_path, monkeypatch):
    registry = RunRegistry(tmp_path / "runs")
    with pytest.raises(AdapterImportError, match="import limit"):
        import_adapter_zip(adapter_zip, registry, max_bytes=50_000)
    monkeypatch.setenv("FINETUNE_STUDIO_IMPORT_MAX_MB", "0.05")
    with pytest.raises(AdapterImportError, match="import limit"):
        import_adapter_zip(adapter_zip, registry)
    monkeypatch.delenv("FINETUNE_STUDIO_IMPORT_MAX_MB")
    text = tmp_path / "notes.zip"
    text.write_text("not a zip")
    with pytest.raises(AdapterImportError, match="not a zip file"):
        import_adapter_zip(text, registry)
    with pytest.raises(AdapterImportError, match="does not exist"):
        import_adapter_zip(tmp_path / "missing.zip", registry)
    assert _entries(registry) == set()

    # A zipped PEFT folder from elsewhere (one top folder, no studio files) imports too.
    nested = tmp_path / "peft.zip"
    with zipfile.ZipFile(adapter_zip) as zin, zipfile.ZipFile(nested, "w") as zout:
        zout.writestr("my adapter/", b"")
        for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            zout.writestr(f"my adapter/{name}", zin.read(name))
        zout.writestr("my adapter/helper.py", b"import os")  # code is never copied
    run = import_adapter_zip(nested, registry, name="From PEFT")
    assert run.id == "From-PEFT-imported" and run.config().model == str(tiny_model_dir)
    assert run.fingerprint()["hidden_size"] == 64  # computed from the base
    assert not (run.weights_dir() / "helper.py").exists() and "helper.py" in run.status().message
    assert run.is_trained() and run.config().method == "lora"
