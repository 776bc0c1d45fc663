"""What an adapter was trained on: a fingerprint of its base model, checked before every load.

An adapter only means something on the base it was trained on. Loading a LoRA onto a model of
another architecture or size either fails deep inside PEFT with a shape error or, worse, loads
and talks nonsense. So every run records its base's fingerprint (``fingerprint.json`` next to
the weights, and inside exported zips), and the playground and importer compare it with the
base they are about to use:

- architecture, layer count, widths or vocabulary differ -> refused, naming both bases;
- the base's weights differ (``weights``: the base was updated or replaced under the same name)
  -> refused, naming both digests and what to do;
- tokenizer vocabulary or chat template differ -> a warning (it loads, but prompts may be
  tokenised or formatted differently than in training).

The structure comes from the model's config and tokenizer. The weights digest (``weights_digest``)
reads each safetensors file's header and 16 samples of 4 KiB: milliseconds even for a 16 GB
base, where hashing every byte would take about a minute. It catches a base re-saved with other
weights (fine-tuned or re-converted: every tensor moves, so every sample does), a changed
dtype, shape or tensor list (the header); it can miss an edit confined to bytes between the
samples (one tensor changed in place, same shape). Fingerprints written before the digest
existed still load, with a warning that the weights could not be compared.
"""

from __future__ import annotations

import hashlib
import json
import struct
import threading
from pathlib import Path
from typing import Any

from studio.runs.files import atomic_write_text, read_json, stamp

FILE = "fingerprint.json"

# Config fields that decide whether adapter weights fit the base: a difference here is fatal.
STRUCTURAL = (
    "model_type",
    "architectures",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)
# Differences that still load but change what the model sees: warned about.
SOFT = ("tokenizer_sha256", "chat_template_sha256")
SAMPLES, SAMPLE_BYTES = 16, 4096  # what weights_digest reads of each file's data, evenly spread


def _sha(text: str | None) -> str | None:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16] if text else None


def fingerprint(model_config, tokenizer, model_ref: str) -> dict[str, Any]:
    """The fingerprint of a base model from its (transformers) config and tokenizer."""
    text_cfg = getattr(model_config, "get_text_config", lambda: model_config)()
    fp: dict[str, Any] = {"model": model_ref}
    for key in STRUCTURAL:
        value = getattr(text_cfg, key, None)
        if value is None:
            value = getattr(model_config, key, None)
        fp[key] = list(value) if isinstance(value, (list, tuple)) else value
    if fp["num_key_value_heads"] is None:  # older configs mean "same as attention heads"
        fp["num_key_value_heads"] = fp["num_attention_heads"]
    vocab = tokenizer.get_vocab()
    fp["tokenizer_sha256"] = _sha(json.dumps(sorted(vocab.items())))
    fp["chat_template_sha256"] = _sha(getattr(tokenizer, "chat_template", None))
    fp["weights"] = current_digest(model_ref)
    return fp


_DIGEST_LOCK = threading.Lock()
_DIGESTS: dict[tuple[str, tuple], str] = {}  # (folder, files.stamp) -> digest: once per base version


def weights_digest(folder: str | Path) -> str | None:
    """A cheap digest of a model folder's weights (16 hex), None when it has no safetensors.

    For each ``*.safetensors`` file in name order: its name, its size, the sha256 of its JSON
    header (the first 8 bytes give the header's length; it lists every tensor's name, dtype,
    shape and offsets) and the sha256 of ``SAMPLES`` blocks of ``SAMPLE_BYTES`` read at fixed,
    evenly spread offsets of the tensor data. Computed once per version of the files (cached by
    path, sizes, mtimes and inodes), not per load or request. See the module docstring for what
    it catches and what it can miss.
    """
    folder = Path(folder)
    key = (str(folder.resolve()), stamp(folder))
    if not key[1]:
        return None
    with _DIGEST_LOCK:
        if key not in _DIGESTS:
            h = hashlib.sha256()
            for f in sorted(folder.glob("*.safetensors")):
                h.update(_file_digest(f).encode())
            _DIGESTS[key] = h.hexdigest()[:16]
        return _DIGESTS[key]


def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    with path.open("rb") as fh:
        header_len = struct.unpack("<Q", fh.read(8))[0] if size >= 8 else 0
        header = fh.read(header_len)
        start = 8 + header_len
        span = max(0, size - start - SAMPLE_BYTES)
        samples = hashlib.sha256()
        for i in range(SAMPLES):
            fh.seek(start + span * i // (SAMPLES - 1))
            samples.update(fh.read(SAMPLE_BYTES))
    return f"{path.name}:{size}:{hashlib.sha256(header).hexdigest()}:{samples.hexdigest()}"


def base_changed(trained_on: dict[str, Any] | None, model_ref: str | None) -> bool:
    """True when the base ``model_ref`` is on this machine and its weights' digest is not the one
    ``trained_on`` recorded: the run was "trained on another base". False when either is unknown.
    Cheap enough for every row of a runs list (the digest is cached per version of the files)."""
    if not trained_on or not trained_on.get("weights") or not model_ref:
        return False
    now = current_digest(model_ref)
    return now is not None and now != trained_on["weights"]


def current_digest(model_ref: str) -> str | None:
    """The weights digest of the base named ``model_ref`` when its files are on this machine
    (never downloads, never asks the network), else None."""
    from studio import models

    folder = models.local_folder(model_ref)
    return weights_digest(folder) if folder is not None else None


def for_model_ref(model_ref: str, trust_remote_code: bool = False) -> dict[str, Any]:
    """The fingerprint of a base named by ``model_ref`` (config and tokenizer only, no weights).

    Raises:
        ModelError: the base cannot be found or read.
    """
    from transformers import AutoConfig

    from studio import models

    try:
        cfg = AutoConfig.from_pretrained(models.resolve(model_ref), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise models.ModelError(models._not_found(model_ref, exc)) from None
    return fingerprint(cfg, models.load_tokenizer(model_ref, trust_remote_code), model_ref)


def read(folder: str | Path) -> dict[str, Any] | None:
    """The fingerprint saved in ``folder``, or None when there is none (older runs, other tools)."""
    data = read_json(Path(folder) / FILE)
    return data if isinstance(data, dict) else None


def write(folder: str | Path, fp: dict[str, Any]) -> None:
    atomic_write_text(Path(folder) / FILE, json.dumps(fp, indent=2))


def _short(digest: str) -> str:
    return digest[:12]


def _describe(fp: dict[str, Any]) -> str:
    arch = (fp.get("architectures") or [fp.get("model_type") or "?"])[0]
    return (
        f"`{fp.get('model', '?')}` ({arch}, {fp.get('num_hidden_layers')} layers, hidden "
        f"{fp.get('hidden_size')}, vocab {fp.get('vocab_size')})"
    )


def changed_sentence(model: str, was: str, now: str, run_dir: str | Path | None = None) -> str:
    """What to say when the base under ``model`` has other weights than the adapter trained on."""
    config = Path(run_dir) / "config.yaml" if run_dir is not None else "RUN_FOLDER/config.yaml"
    return (
        f"The base at `{model}` changed since this adapter was trained (its weights' digest was "
        f"{_short(was)}, it is {_short(now)} now): the adapter was trained on another base. Put the "
        "original base back, re-evaluate it on this base (finetune-studio eval RUN@vN --on-changed-base), "
        f"or retrain it on this one with the same settings (finetune-studio train --config {config})."
    )


def changed_weights(trained_on: dict[str, Any] | None, model_ref: str | None, run_dir=None) -> str | None:
    """The sentence naming both digests when the base ``model_ref`` on this machine has other
    weights than ``trained_on`` recorded, else None (unchanged, or either is unknown)."""
    if not base_changed(trained_on, model_ref):
        return None
    return changed_sentence(model_ref, trained_on["weights"], current_digest(model_ref), run_dir)


def compare(
    trained_on: dict[str, Any],
    base: dict[str, Any],
    run_dir: str | Path | None = None,
    accept_changed_weights: bool = False,
) -> tuple[list[str], list[str]]:
    """(errors, warnings) for using an adapter trained on ``trained_on`` with ``base``.

    Errors mean the adapter must not be loaded; warnings mean it loads but may behave
    differently than in training. ``accept_changed_weights``: a base whose weights changed is a
    warning (an evaluation on the new base, asked for by name), not an error. Each is a sentence
    naming both bases. ``run_dir`` (the run's folder, when there is one) goes into the retrain
    command an error suggests.
    """
    errors, warnings = [], []
    differing = [
        k for k in STRUCTURAL if trained_on.get(k) is not None and base.get(k) is not None and trained_on[k] != base[k]
    ]
    if differing:
        detail = ", ".join(f"{k} {trained_on[k]} vs {base[k]}" for k in differing)
        errors.append(
            f"This adapter was trained on {_describe(trained_on)}, but the base here is "
            f"{_describe(base)} ({detail}). Load it with the base it was trained on."
        )
    if not errors and trained_on.get("weights") and base.get("weights"):
        if trained_on["weights"] != base["weights"]:
            model = base.get("model") or trained_on.get("model") or "?"
            sentence = changed_sentence(model, trained_on["weights"], base["weights"], run_dir)
            (warnings if accept_changed_weights else errors).append(sentence)
    elif not errors and (trained_on.get("weights") or base.get("weights")):
        warnings.append(
            "The base's weights could not be compared with the ones this adapter was trained on (one "
            "fingerprint has no weights digest: it predates the check, or the base is not on this "
            "machine): if the base was updated under the same name, replies may not match training."
        )
    if not errors:
        if (
            trained_on.get("tokenizer_sha256")
            and base.get("tokenizer_sha256")
            and trained_on["tokenizer_sha256"] != base["tokenizer_sha256"]
        ):
            warnings.append(
                f"The tokenizer differs from the one used in training ({_describe(trained_on)} "
                f"vs {_describe(base)}): text may be split into different tokens."
            )
        if (
            trained_on.get("chat_template_sha256") != base.get("chat_template_sha256")
            and "chat_template_sha256" in trained_on
        ):
            warnings.append(
                "The chat template differs from the one used in training: prompts are "
                "formatted differently, so replies may not match what it learned."
            )
    return errors, warnings
