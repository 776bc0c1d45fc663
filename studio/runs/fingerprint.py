"""What an adapter was trained on: a fingerprint of its base model, checked before every load.

An adapter only means something on the base it was trained on. Loading a LoRA onto a model of
another architecture or size either fails deep inside PEFT with a shape error or, worse, loads
and talks nonsense. So every run records its base's fingerprint (``fingerprint.json`` next to
the weights, and inside exported zips), and the playground and importer compare it with the
base they are about to use:

- architecture, layer count, widths or vocabulary differ -> refused, naming both bases;
- tokenizer vocabulary or chat template differ -> a warning (it loads, but prompts may be
  tokenised or formatted differently than in training).

The fingerprint is computed from the model's config and tokenizer only, so checking a base
never needs its weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from studio.runs.files import atomic_write_text, read_json

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
    return fp


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


def _describe(fp: dict[str, Any]) -> str:
    arch = (fp.get("architectures") or [fp.get("model_type") or "?"])[0]
    return (
        f"`{fp.get('model', '?')}` ({arch}, {fp.get('num_hidden_layers')} layers, hidden "
        f"{fp.get('hidden_size')}, vocab {fp.get('vocab_size')})"
    )


def compare(trained_on: dict[str, Any], base: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(errors, warnings) for using an adapter trained on ``trained_on`` with ``base``.

    Errors mean the adapter must not be loaded; warnings mean it loads but may behave
    differently than in training. Each is a sentence naming both bases.
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
