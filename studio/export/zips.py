"""Package a trained run as a zip that loads anywhere: the adapter (PEFT, transformers, vLLM) or
the merged model (plain transformers).

Adapter zip ``<run id>-v<version>-adapter.zip`` (``-model.zip`` for full fine-tuning):
    adapter_model.safetensors, adapter_config.json   the LoRA weights and PEFT config
    tokenizer files, chat template                   as used in training
    config.yaml, metrics.csv, loss_curve.svg         how it was trained and how the loss fell
    fingerprint.json, run.json, evaluation.json      the base it needs and its scores (read on import)
    lineage.json                                     the version: its base, data, config, scores, parent
    README.md                                        the model card

Merged zip ``<run id>-v<version>-merged.zip``: config.json, model.safetensors, generation config,
tokenizer, the card, config.yaml, metrics.csv and the curve.

Every zip is written under a hidden temp name and renamed when complete, so a partial zip never
appears under the final name.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

from studio.evaluation import stored
from studio.export.model_card import LOSS_CURVE, loss_curve_svg, model_card
from studio.models import base_id
from studio.runs import versions
from studio.runs.records import EvalRecord, TrainRecord
from studio.runs.registry import Run

# Files of a run that travel in every zip and that the importer reads back.
RUN_JSON = "run.json"
LINEAGE = "lineage.json"  # versions.public: no local paths
VERSION_FILES = (versions.RECORD, versions.SCORES, "fingerprint.json")
# status.json fields worth carrying to another studio (the importer reads only these).
CARRIED_STATUS = (
    "name",
    "version",
    "method",
    "model",
    "data_sha256",
    "train_rows",
    "eval_rows",
    "step",
    "final_loss",
    "eval_loss",
    "base_eval_loss",
    "trainable_params",
    "precision",  # so an imported adapter computes as its source did (same greedy answers)
)
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. What is 2 plus 3?"


class ExportError(RuntimeError):
    """The run cannot be exported; the message says why and what to do."""


def artifact_name(run: Run, kind: str) -> str:
    """``<run id>-v<version>-<kind>.zip``; a finished run from before versioning counts as v1."""
    return f"{run.id}-v{max(run.version, 1)}-{kind}.zip"


def finished_weights(run: Run) -> Path:
    status = run.status()
    weights = run.weights_dir()
    if status.state != "finished" or weights is None:
        raise ExportError(
            f"Run {run.id} is {status.state} and has no finished adapter to export; export a finished run."
        )
    return weights


def write_zip(out: Path, fill: Callable[[zipfile.ZipFile], None]) -> Path:
    """Build a zip under a hidden temp name and rename it into place; on failure remove the temp."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}-{time.monotonic_ns()}.tmp")  # two exports at once never collide
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            fill(zf)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


STORE_ABOVE = 64 * 2**20


def _add_file(zf: zipfile.ZipFile, path: Path, arcname: str) -> None:
    # Measured on this CPU: deflate makes a 20 MB LoRA 10% smaller in about 1 s, worth it; on a
    # 540 MB merged model it would cost about 90 s, too long for a download button, so big
    # weights are stored as they are.
    stored = path.suffix == ".safetensors" and path.stat().st_size > STORE_ABOVE
    zf.write(path, arcname, compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)


def _add_run_files(zf: zipfile.ZipFile, run: Run, card: str) -> None:
    """What every zip carries besides the weights: config, metrics, curve, card."""
    zf.writestr("config.yaml", run.config().to_yaml())  # a pinned view: the settings its version trained with
    zf.writestr("metrics.csv", _metrics_csv(run))
    svg = loss_curve_svg(run.train_metrics(), run.eval_metrics(), f"{run.name} (v{max(run.version, 1)})")
    if svg:
        zf.writestr(LOSS_CURVE, svg)
    zf.writestr("README.md", card)


def export_zip(run: Run, out: str | Path | None = None) -> Path:
    """Write the adapter zip (``<run id>-v<version>-adapter.zip`` in the run folder, or ``out``).

    Raises:
        ExportError: the run has no finished adapter or model.

    Example:
        >>> export_zip(RunRegistry().get("20261122-153000-lora-train"))  # doctest: +SKIP
    """
    weights = finished_weights(run)
    cfg = run.config()
    out = Path(out) if out else run.path / artifact_name(run, "model" if cfg.method == "full" else "adapter")

    def fill(zf: zipfile.ZipFile) -> None:
        for f in sorted(weights.iterdir()):
            # PEFT writes a stub README.md; ours (the model card) replaces it. The version's own
            # records are written below without this machine's paths.
            if not f.is_file() or f.name.startswith(".") or f.name in ("README.md", *VERSION_FILES):
                continue
            if f.name == "adapter_config.json":
                zf.writestr(f.name, _portable_adapter_config(f, cfg.model))
            else:
                _add_file(zf, f, f.name)
        for fp in (weights / "fingerprint.json", run.path / "fingerprint.json"):  # the version's, else the run's
            if fp.is_file():
                zf.write(fp, "fingerprint.json")
                break
        zf.writestr(LINEAGE, json.dumps(versions.public(run.get_version(run.version)), indent=2))
        evaluation = run.evaluation()
        if evaluation is not None:
            zf.writestr("evaluation.json", json.dumps(evaluation, indent=2))
        task = stored.latest_of_weights(run)
        if task is not None:  # the task scores the card reports, with every row they came from
            zf.writestr(stored.TASK_RESULT, json.dumps(stored.portable(task), indent=2))
            if Path(task["examples"]).is_file():
                _add_file(zf, Path(task["examples"]), stored.TASK_EXAMPLES)
        status = run.status().to_dict()
        zf.writestr(
            RUN_JSON,
            json.dumps(
                {
                    "run_id": run.id,
                    "exported_at": time.time(),
                    "format": 1,
                    **{k: status[k] for k in CARRIED_STATUS if k in status},
                },
                indent=2,
            ),
        )
        _add_run_files(zf, run, model_card(run, "model" if cfg.method == "full" else "adapter"))

    return write_zip(out, fill)


def _portable_adapter_config(path: Path, model_ref: str) -> str:
    """adapter_config.json names the base by the path it was loaded from on this machine (for the
    bundled default, a cache folder); point it at the hub id instead so that PEFT's
    ``AutoPeftModelForCausalLM`` and transformers find the base elsewhere."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(cfg, dict):
        cfg["base_model_name_or_path"] = base_id(model_ref)
    return json.dumps(cfg, indent=2)


def export_merged(run: Run, out: str | Path | None = None) -> Path:
    """Write ``<run id>-v<version>-merged.zip``: a standalone safetensors model with the adapter
    folded into the weights (PEFT ``merge_and_unload`` on a float32 copy of the base). For full
    fine-tuning runs it is the trained model itself. A zip already built for this version, newer
    than the run's files, is reused.

    The merge is checked as it is made: logits of the merged model and of base + adapter on a
    short probe must agree to 1e-3 (they agree to about 1e-6 in float32), and the card states the
    measured difference.

    Raises:
        ExportError: the run has no finished weights, its base cannot be loaded, or the check fails.
    """
    weights = finished_weights(run)
    cfg = run.config()
    default_out = run.path / artifact_name(run, "merged")
    out = Path(out) if out else default_out
    if out == default_out and out.exists() and out.stat().st_mtime >= newest_input(run, weights):
        return out
    if cfg.method == "full":
        card = model_card(run, "model")
        return write_zip(out, lambda zf: (_add_dir(zf, weights), _add_run_files(zf, run, card)))
    for stale in run.path.glob(".merge-*"):  # left by a process killed mid-merge
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=".merge-", dir=run.path))
    try:
        caveat = merge_into(run, weights, work)
        card = model_card(run, "merged", caveat)
        return write_zip(out, lambda zf: (_add_dir(zf, work), _add_run_files(zf, run, card)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _add_dir(zf: zipfile.ZipFile, folder: Path) -> None:
    for f in sorted(folder.iterdir()):
        if f.is_file() and not f.name.startswith(".") and f.name != "README.md" and f.suffix != ".pt":
            _add_file(zf, f, f.name)


def newest_input(run: Run, weights: Path) -> float:
    paths = [*weights.iterdir(), run.path / "status.json", run.path / "config.yaml", run.path / "evaluation.json"]
    return max((p.stat().st_mtime for p in paths if p.is_file()), default=0.0)


def merged_dtype(model_path: str):
    """The dtype the base is stored in (the merged model is saved in it, so it is the same size);
    float32 when the config does not say."""
    import torch
    from transformers import AutoConfig

    declared = getattr(AutoConfig.from_pretrained(model_path), "dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if declared in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def merge_into(run: Run, weights: Path, work: Path) -> str:
    """Merge the adapter onto a float32 base, save the model into ``work``; return the card's note."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from studio import models

    cfg = run.config()
    try:
        base = models.load_model(cfg.model, "full", "cpu", trust_remote_code=cfg.trust_remote_code)
        save_dtype = merged_dtype(models.resolve(cfg.model))
    except models.ModelError as exc:
        raise ExportError(f"Cannot merge: the base model is not available here. {exc}") from None
    tok_src = weights if (weights / "tokenizer_config.json").exists() else models.resolve(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(tok_src)
    probe = torch.tensor([tokenizer(PROBE_TEXT)["input_ids"][:32]])
    model = PeftModel.from_pretrained(base, str(weights)).eval()
    with torch.no_grad():
        adapted = model(probe).logits
        merged = model.merge_and_unload()
        diff = (merged(probe).logits - adapted).abs().max().item()
    if not diff < 1e-3:
        raise ExportError(
            f"The merged model's logits differ from the adapted model's by {diff:.2g} "
            "(more than 1e-3); the merge is wrong, so no zip was written. Export the adapter instead."
        )
    merged = merged.to(save_dtype)
    merged.save_pretrained(work)
    tokenizer.save_pretrained(work)
    dtype_name = str(save_dtype).removeprefix("torch.")
    note = (
        f"**Merge check.** Merged in float32 with PEFT `merge_and_unload`; on a {probe.shape[1]}-token "
        f"probe its logits differ from the base + adapter's by at most {diff:.1e}. Saved in {dtype_name}"
        + (", the base's own dtype (rounding adds a little more difference)." if dtype_name != "float32" else ".")
    )
    if cfg.method == "qlora":
        note += (
            "\n\n**QLoRA caveat.** This adapter was trained against the base's 4-bit NF4-rounded weights. "
            "It is merged here onto the full-precision (de-quantized) base, so the merged model's logits "
            "differ slightly from those of the 4-bit adapted model used in training and in the studio's "
            "Chat tab: the rounding the adapter learned to compensate for is gone (small models feel this "
            "most). For the exact trained "
            "behaviour, load the adapter zip onto the base loaded in 4-bit NF4 (`load_in_4bit=True`, "
            '`bnb_4bit_quant_type="nf4"`, `bnb_4bit_use_double_quant=True`).'
        )
    return note


def zip_contents(path: str | Path) -> list[tuple[str, int]]:
    """(file name, uncompressed size in bytes) for every file in a zip, in zip order."""
    with zipfile.ZipFile(path) as zf:
        return [(i.filename, i.file_size) for i in zf.infolist() if not i.is_dir()]


def _metrics_csv(run: Run) -> str:
    rows = [m.to_dict() for m in run.metrics() if isinstance(m, (TrainRecord, EvalRecord))]
    cols = ["kind", "step", "loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "time"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
