"""Import an adapter zip (from another studio, or any PEFT LoRA saved with safetensors) as a run.

A zip from the internet is hostile until proven otherwise, so nothing is written before every
entry has been checked, and what is written goes to a hidden folder that becomes a run with one
rename at the end (or is removed): a refused zip leaves nothing behind.

Checks, in order:
- zip safety (``studio.export.zip_safety``): the zip file and the sum of its uncompressed entries are
  capped (2 GiB by default, ``FINETUNE_STUDIO_IMPORT_MAX_MB`` or ``max_bytes`` to change), an
  entry that inflates more than 100x (a zip bomb) is refused, and so are absolute paths, drive
  letters, backslashes, ``..``, duplicates, links, special files and encryption; extraction
  counts bytes rather than trusting the headers;
- weights: safetensors only; pickle files (.bin, .pt, .pth, .pkl, .ckpt) can run code on load;
- PEFT: ``adapter_config.json`` and ``adapter_model.safetensors`` present, the config is a LoRA;
- base: found on this machine (a local folder, the bundled default or the Hugging Face cache),
  its fingerprint matches the zip's ``fingerprint.json``, and every LoRA matrix has the shape of
  the base layer it adapts (read from the safetensors header and the base built on the meta
  device, so no weights load).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import time
import uuid
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from studio import models
from studio.config import ConfigError, RunConfig
from studio.export.zip_safety import UnsafeZipError, check_entries, extract_members, read_member
from studio.formatting import format_bytes, slug
from studio.planning import memory
from studio.planning.precision import PRECISIONS
from studio.runs import fingerprint, versions
from studio.runs.files import atomic_write_text
from studio.runs.records import EvalRecord, TrainRecord, parse_record
from studio.runs.registry import NAME_MAX, Run, RunRegistry, clean_name

MAX_ENV = "FINETUNE_STUDIO_IMPORT_MAX_MB"
DEFAULT_MAX_BYTES = 2 * 1024**3
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
# What may land in adapter/: weights, configs, tokenizer files. Anything else (code included) is skipped.
ADAPTER_SUFFIXES = (".safetensors", ".json", ".jinja", ".txt", ".model", ".tiktoken")
# Files an exported zip carries about its run; read as metadata, never copied into adapter/.
RUN_FILES = (
    "config.yaml",
    "metrics.csv",
    "fingerprint.json",
    "run.json",
    "evaluation.json",
    "lineage.json",  # the exported version's lineage: becomes the imported version's "source"
    "version.json",  # a version folder zipped by hand: its record names the other machine's files
    "scores.json",
    "task_evaluation.json",  # task scores and their rows: for the reader, not imported as the run's own
    "task_evaluation.examples.jsonl",
    "README.md",
    "loss_curve.svg",
)
META_MAX = 8 * 1024**2  # the most bytes read from one metadata file
FOLDER = "the adapter folder"  # what a message asks the user to zip again


class AdapterImportError(ValueError):
    """The zip cannot be imported; the message says why and what to do."""


def max_import_bytes() -> int:
    """The uncompressed-size cap: ``FINETUNE_STUDIO_IMPORT_MAX_MB`` when set, else 2 GiB."""
    raw = os.environ.get(MAX_ENV, "").strip()
    return int(float(raw) * 1024**2) if raw else DEFAULT_MAX_BYTES


def import_adapter_zip(
    zip_path: str | Path, registry: RunRegistry, name: str | None = None, max_bytes: int | None = None
) -> Run:
    """Check an adapter zip and add it to the registry as a finished run ``<slug>-imported[-n]``.

    Returns the new run; its ``status().import_warnings`` lists tokenizer or chat-template
    differences from the base (it loads, but may behave differently than in training).

    Raises:
        AdapterImportError: the zip is unsafe, not a LoRA adapter, or its base is missing or
            different; nothing is written then.

    Example:
        >>> run = import_adapter_zip("my-adapter.zip", RunRegistry(), name="support bot")  # doctest: +SKIP
    """
    zip_path = Path(zip_path)
    limit = max_bytes or max_import_bytes()
    label = zip_path.name
    if not zip_path.is_file():
        raise AdapterImportError(
            f"{zip_path} does not exist; choose an adapter zip exported by Finetune Studio "
            "or a zipped PEFT adapter folder."
        )
    if zip_path.stat().st_size > limit:
        raise AdapterImportError(
            f"{label} is {format_bytes(zip_path.stat().st_size)}, above the import limit of {format_bytes(limit)}; "
            f"an adapter is usually a few MB. Raise the limit with {MAX_ENV} if it is right."
        )
    display = _display_name(name)
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError):
        raise AdapterImportError(
            f"{label} is not a zip file (or is damaged); export the adapter again and upload the .zip."
        ) from None
    with zf:
        root, members = _check_zip(zf, label, limit)
        adapter_cfg = _adapter_config(zf, root, label)
        meta = _metadata(zf, root)
        base, notes = _find_base(adapter_cfg, meta)
        try:
            base_fp = fingerprint.for_model_ref(base)
        except models.ModelError as exc:
            raise AdapterImportError(f"The base model `{base}` cannot be read: {exc}") from None
        trained_on = meta.get("fingerprint")
        warnings = list(notes)
        if trained_on:
            errors, soft = fingerprint.compare(trained_on, base_fp)
            if errors:
                raise AdapterImportError(" ".join(errors))
            warnings += soft
        _remove_stale(registry.root, ".importing-*")
        work = registry.root / f".importing-{uuid.uuid4().hex[:12]}"
        try:
            run_dir = work / "run"
            adapter_dir = versions.folder_for(run_dir, 1)
            adapter_dir.mkdir(parents=True)
            skipped = _extract(zf, root, members, adapter_dir, limit, label)
            _check_shapes(adapter_dir / "adapter_model.safetensors", base, label)
            run = _write_run(Run(run_dir), zip_path, display, base, adapter_cfg, meta, base_fp, warnings, skipped)
            _commit_imported(run, meta, zip_path)
            final = _claim(registry.root, slug(run.name, 40, fallback="adapter"), run_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return Run(final)


def _remove_stale(folder: Path, pattern: str, age_s: float = 3600) -> None:
    """Work folders left by a process killed mid-way (a finished one removes its own)."""
    for stale in folder.glob(pattern):
        try:
            if time.time() - stale.stat().st_mtime > age_s:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            continue


def _display_name(name: str | None) -> str | None:
    """The name asked for, by the rename rule (``runs.clean_name``); None (or blank) keeps the zip's."""
    if name is None or not str(name).strip():
        return None
    try:
        return clean_name(name)
    except ValueError as exc:
        raise AdapterImportError(str(exc)) from None


def _printable(value: Any) -> str:
    """A name read from the zip's metadata, made fit to show: never refused, since it is optional."""
    text = value if isinstance(value, str) else ""
    return " ".join("".join(ch for ch in text if ch.isprintable()).split())[:NAME_MAX]


def _check_zip(zf: zipfile.ZipFile, label: str, limit: int) -> tuple[str, list[zipfile.ZipInfo]]:
    """Refuse the whole zip on any unsafe entry or pickle; return the adapter's folder inside the
    zip (``""`` or ``"name/"``) and the files under it."""
    try:
        infos = check_entries(
            zf,
            label,
            limit,
            folder=FOLDER,
            count_fix="an adapter zip holds a dozen files. Zip just the adapter folder.",
            size_fix=f"an adapter is usually a few MB. Raise the limit with {MAX_ENV} if it is right.",
        )
    except UnsafeZipError as exc:
        raise AdapterImportError(str(exc)) from None
    for info in infos:
        if not info.is_dir() and info.filename.lower().endswith(PICKLE_SUFFIXES):
            raise AdapterImportError(
                f"{label} holds {info.filename!r}, a pickle file: loading pickles can run code, so Finetune Studio "
                "imports safetensors only. Convert the adapter with `model.save_pretrained(folder, "
                "safe_serialization=True)` (PEFT writes adapter_model.safetensors) and zip that folder without "
                ".bin/.pt files."
            )
    configs = [i.filename for i in infos if PurePosixPath(i.filename).name == "adapter_config.json"]
    if len(configs) != 1:
        found = ", ".join(sorted(i.filename for i in infos if not i.is_dir())[:8]) or "nothing"
        what = "no adapter_config.json" if not configs else f"{len(configs)} adapter_config.json files"
        raise AdapterImportError(
            f"{label} has {what}; an adapter zip needs exactly one folder with "
            f"adapter_config.json and adapter_model.safetensors (found: {found})."
        )
    root = configs[0][: -len("adapter_config.json")]
    members = [i for i in infos if i.filename.startswith(root) and not i.is_dir()]
    if root + "adapter_model.safetensors" not in {i.filename for i in members}:
        raise AdapterImportError(
            f"{label} has adapter_config.json but no adapter_model.safetensors next to it; "
            "save the adapter with PEFT's save_pretrained and zip the whole folder."
        )
    return root, members


def _adapter_config(zf: zipfile.ZipFile, root: str, label: str) -> dict[str, Any]:
    raw = read_member(zf, root + "adapter_config.json", META_MAX)
    try:
        cfg = json.loads(raw or b"")
    except ValueError:
        cfg = None
    if not isinstance(cfg, dict):
        raise AdapterImportError(
            f"adapter_config.json in {label} is not a JSON object; save the adapter again with PEFT's save_pretrained."
        )
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise AdapterImportError(
            f"{label} holds a {cfg.get('peft_type') or 'non-PEFT'} adapter; Finetune Studio "
            "imports LoRA adapters (peft_type LORA) only."
        )
    r = cfg.get("r")
    if not isinstance(r, int) or not 1 <= r <= 4096 or not cfg.get("target_modules"):
        raise AdapterImportError(
            f"adapter_config.json in {label} lacks a valid rank `r` or `target_modules`; "
            "save the adapter again with PEFT's save_pretrained."
        )
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterImportError(
            f"{label} is a {cfg['task_type']} adapter; Finetune Studio works with causal "
            "language models (task_type CAUSAL_LM)."
        )
    return cfg


def _metadata(zf: zipfile.ZipFile, root: str) -> dict[str, Any]:
    """The optional run files an exported zip carries; anything unreadable is ignored."""
    meta: dict[str, Any] = {}
    for key, fname in (
        ("fingerprint", "fingerprint.json"),
        ("run", "run.json"),
        ("evaluation", "evaluation.json"),
        ("lineage", "lineage.json"),
    ):
        try:
            value = json.loads(read_member(zf, root + fname, META_MAX) or b"null")
        except ValueError:
            value = None
        if isinstance(value, dict):
            meta[key] = value
    raw = read_member(zf, root + "config.yaml", META_MAX)
    if raw:
        try:
            meta["config"] = RunConfig.from_dict(yaml.safe_load(raw.decode("utf-8")))
        except (yaml.YAMLError, UnicodeDecodeError, ConfigError, TypeError, AttributeError):
            pass
    raw = read_member(zf, root + "metrics.csv", META_MAX)
    if raw:
        meta["metrics"] = _parse_metrics(raw)
    return meta


def _parse_metrics(raw: bytes) -> list[TrainRecord | EvalRecord]:
    """The train and eval records of an exported ``metrics.csv``; anything else is dropped."""
    out = []
    try:
        rows = list(csv.DictReader(io.StringIO(raw.decode("utf-8"))))
    except (UnicodeDecodeError, csv.Error):
        return []
    for row in rows[:200_000]:
        if row.get("kind") not in (TrainRecord.KIND, EvalRecord.KIND):
            continue
        rec: dict[str, Any] = {"kind": row["kind"]}
        for key, value in row.items():
            if key in ("kind", None) or value in (None, ""):
                continue
            try:
                num = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(num):
                rec[str(key)[:40]] = int(num) if key == "step" else num
        record = parse_record(rec)
        if isinstance(record, (TrainRecord, EvalRecord)):
            out.append(record)
    return out


def _find_base(adapter_cfg: dict[str, Any], meta: dict[str, Any]) -> tuple[str, list[str]]:
    """The first named base that exists here: config.yaml's model, the fingerprint's, then PEFT's
    ``base_model_name_or_path``. The bundled default stands in for its hub id offline."""
    cands = [
        getattr(meta.get("config"), "model", None),
        (meta.get("fingerprint") or {}).get("model"),
        adapter_cfg.get("base_model_name_or_path"),
    ]
    names: list[str] = []
    for c in cands:
        if isinstance(c, str) and c.strip() and c.strip() not in names:
            if c.strip() == models.DEFAULT_HUB_ID and models.DEFAULT_MODEL not in names:
                names.append(models.DEFAULT_MODEL)
            names.append(c.strip())
    if not names:
        raise AdapterImportError(
            "The adapter does not name its base model (adapter_config.json has no "
            "base_model_name_or_path); set it to the base's hub id or folder and zip it again."
        )
    reasons = []
    for ref in names:
        try:
            models.resolve(ref)
        except models.ModelError as exc:
            reasons.append(str(exc))
            continue
        notes = []
        if ref == models.DEFAULT_MODEL and models.DEFAULT_MODEL not in cands:
            notes.append(
                f"The base {models.DEFAULT_HUB_ID} is used as the studio's bundled copy (dequantized from a Q4_1 "
                "GGUF), whose weights differ slightly from the hub's."
            )
        return ref, notes
    named = " or ".join(f"`{n}`" for n in names)
    raise AdapterImportError(
        f"This adapter needs the base model {named}, which is not available on this machine "
        f"({reasons[-1]}) Copy the base model's folder here or download it on a connected "
        "machine, then import again."
    )


def _extract(
    zf: zipfile.ZipFile, root: str, members: list[zipfile.ZipInfo], dest: Path, limit: int, label: str
) -> list[str]:
    """Copy the adapter's files under ``dest``, counting real bytes (headers can lie). Returns the
    names skipped (run metadata is read separately; unknown file types are not copied)."""
    wanted, skipped = [], []
    for info in members:
        rel = info.filename[len(root) :]
        if rel in RUN_FILES:
            continue
        if rel.lower().endswith(ADAPTER_SUFFIXES):
            wanted.append(info)
        else:
            skipped.append(rel)
    try:
        extract_members(zf, wanted, dest, limit, label, root=root, folder=FOLDER)
    except UnsafeZipError as exc:
        raise AdapterImportError(str(exc)) from None
    return skipped


_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


def _check_shapes(weights: Path, base: str, label: str) -> None:
    """Every LoRA matrix must fit the base layer it adapts: A is (r, in), B is (out, r)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterImportError(
            f"adapter_model.safetensors in {label} is not a valid safetensors file ({exc}); save the adapter again."
        ) from None
    if not any(_KEY.match(k) for k in shapes):
        raise AdapterImportError(
            f"adapter_model.safetensors in {label} holds no LoRA weights (lora_A/lora_B); "
            "save the adapter again with PEFT's save_pretrained."
        )
    try:  # the base built on the meta device: its layer shapes without memory or weights
        layers = {lin.name: (lin.d_in, lin.d_out) for lin in memory.shape_for_model(base).linears}
    except Exception:  # noqa: BLE001 - an architecture transformers cannot build: the fingerprint check stands
        return
    for key, shape in shapes.items():
        m = _KEY.match(key)
        if not m:
            continue
        mod, which = m.groups()
        if mod not in layers:
            raise AdapterImportError(
                f"The adapter adapts a layer `{mod}` that the base `{base}` does not have: "
                "it was trained on another base. Import it where its own base is available."
            )
        want_in, want_out = layers[mod]
        got = shape[1] if which == "A" else shape[0]
        want = want_in if which == "A" else want_out
        if len(shape) != 2 or got != want:
            side = "inputs" if which == "A" else "outputs"
            raise AdapterImportError(
                f"The adapter's layer `{mod}` has {side} of width {got}, but the base `{base}` "
                f"has {want}: it was trained on another base. Import it where its own base "
                "is available."
            )


_NUMBERS = ("train_rows", "eval_rows", "step", "final_loss", "eval_loss", "base_eval_loss", "trainable_params")


def _write_run(
    run: Run,
    zip_path: Path,
    name: str | None,
    base: str,
    adapter_cfg: dict[str, Any],
    meta: dict[str, Any],
    base_fp: dict[str, Any],
    warnings: list[str],
    skipped: list[str],
) -> Run:
    src = meta.get("run") or {}
    cfg: RunConfig | None = meta.get("config")
    method = "qlora" if cfg is not None and cfg.method == "qlora" else "lora"
    targets = adapter_cfg["target_modules"]
    targets = ",".join(map(str, targets)) if isinstance(targets, list) else str(targets)
    alpha = adapter_cfg.get("lora_alpha", adapter_cfg["r"])
    lora = {
        "r": adapter_cfg["r"],
        "alpha": int(round(alpha)) if isinstance(alpha, (int, float)) else adapter_cfg["r"],
        "dropout": float(adapter_cfg.get("lora_dropout") or 0.0),
        "targets": targets,
    }
    raw = cfg.to_dict() if cfg is not None else {}
    # Whatever the zip says, an import never runs a model's own code and points at no data file here.
    raw.update(model=base, method=method, trust_remote_code=False, lora=lora)
    raw["data"] = {**raw.get("data", {}), "path": "", "eval_path": ""}
    try:
        config = RunConfig.from_dict(raw)
    except ConfigError:
        config = RunConfig.from_dict({"model": base, "method": method})
    atomic_write_text(run.config_path, config.to_yaml())
    metrics = meta.get("metrics") or []
    if metrics:
        atomic_write_text(run.metrics_path, "".join(json.dumps(m.to_dict()) + "\n" for m in metrics))
    ev = _clean_evaluation(meta.get("evaluation"))
    if ev:
        run.save_evaluation(ev)
    fingerprint.write(run.path, meta.get("fingerprint") or base_fp)
    fields: dict[str, Any] = {
        k: src[k] for k in _NUMBERS if isinstance(src.get(k), (int, float)) and not isinstance(src.get(k), bool)
    }
    trains = [m for m in metrics if isinstance(m, TrainRecord)]
    evals = [m for m in metrics if isinstance(m, EvalRecord)]
    if trains:
        fields.setdefault("final_loss", trains[-1].loss)
        fields.setdefault("step", trains[-1].step)
    if evals:
        fields.setdefault("eval_loss", evals[-1].eval_loss)
    digest = src.get("data_sha256")
    if isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{8,64}", digest):
        fields["data_sha256"] = digest
    if src.get("precision") in PRECISIONS:  # zips from before it carried none: scored in fp32
        fields["precision"] = src["precision"]
    # The name it had, else the id it had (an upload's file name may be a browser temp name).
    display = name or _printable(src.get("name")) or _printable(src.get("run_id")) or zip_path.stem[:NAME_MAX]
    message = f"Imported from {zip_path.name}."
    if skipped:
        message += f" Skipped {len(skipped)} file(s) that are not weights or tokenizer files: {', '.join(skipped[:5])}."
    now = time.time()
    run.set_status(
        "finished",
        imported=True,
        version=1,
        name=display,
        created_at=now,
        finished_at=now,
        method=method,
        model=base,
        total_steps=fields.get("step", 0),
        message=message,
        import_warnings=warnings,
        source_run=str(src.get("run_id", ""))[:120] or None,
        source_version=src.get("version") if isinstance(src.get("version"), int) else None,
        **fields,
    )
    return run


def _commit_imported(run: Run, meta: dict[str, Any], zip_path: Path) -> None:
    """The imported adapter is the run's v1, with what the zip knows of where it came from: its
    source run and version, and that version's lineage (base, data, settings, scores)."""
    src, lineage = meta.get("run") or {}, meta.get("lineage") or {}
    known: dict[str, Any] = {}
    for key in ("data", "config"):  # read from an upload: plain JSON objects only, shown as text
        if isinstance(lineage.get(key), dict):
            known[key] = json.loads(json.dumps(lineage[key], default=str))
    for key in ("device", "precision"):
        if isinstance(lineage.get(key), str):
            known[key] = _printable(lineage[key])[:40]
    if isinstance(lineage.get("train_seconds"), (int, float)) and not isinstance(lineage["train_seconds"], bool):
        known["train_seconds"] = float(lineage["train_seconds"])
    if isinstance(lineage.get("scores"), list):  # the source's scores: not this version's own
        known["source_scores"] = [s for s in lineage["scores"] if isinstance(s, dict)][: versions.SCORES_KEPT]
    run.commit_version(
        1,
        "imported",
        source={
            "zip": zip_path.name,
            "run": str(src.get("run_id", ""))[:120] or None,
            "version": lineage.get("version") if isinstance(lineage.get("version"), int) else src.get("version"),
            "parent": lineage.get("parent") if isinstance(lineage.get("parent"), int) else None,
        },
        **known,
    )


def _clean_evaluation(ev: Any) -> dict[str, Any] | None:
    if not isinstance(ev, dict):
        return None
    out: dict[str, Any] = {}
    for side in ("base", "adapter"):
        if isinstance(ev.get(side), dict):
            out[side] = {
                k: v
                for k, v in ev[side].items()
                if k in ("loss", "perplexity", "rows") and isinstance(v, (int, float)) and not isinstance(v, bool)
            }
    samples = ev.get("samples") if isinstance(ev.get("samples"), list) else []
    out["samples"] = [
        {k: str(s.get(k, ""))[:2000] for k in ("prompt", "base", "adapter")}
        for s in samples[:20]
        if isinstance(s, dict)
    ]
    return out if out.get("base") or out.get("adapter") else None


def _claim(root: Path, slug: str, built: Path) -> Path:
    """Rename the finished folder to ``<slug>-imported[-n]``: one rename, so a run appears whole."""
    for n in range(1, 10_000):
        final = root / (f"{slug}-imported" + (f"-{n}" if n > 1 else ""))
        if final.exists() or (root / "deployments" / f"{final.name}.json").exists():  # a request's name is one thing
            continue
        try:
            os.rename(built, final)
        except OSError:
            if final.exists():  # taken between the check and the rename
                continue
            raise
        return final
    raise AdapterImportError(f"Too many imported runs called {slug}; rename some or pass another name.")
