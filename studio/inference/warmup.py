"""Import, before the server takes requests, what request handlers would otherwise import lazily.

Why: transformers hands out its names through a lazy module whose first lookups are not
thread-safe. In a cold process, two Gradio handlers running ``from transformers import
AutoTokenizer`` at the same moment (one upload fires several events) can raise
``ImportError: cannot import name 'AutoTokenizer' from 'transformers'``, and the newcomer's first
upload shows "Error". Importing everything once, on the main thread, before the server starts
leaves nothing for handlers to race on. It moves the import time from the first upload to
start-up rather than adding any: `python app.py` answered after 8.3 s without it and 13.8 s with
it on an idle 2-core machine (21-22 s on a busy one).

Keep :data:`PRELOAD` in step with the imports inside functions in ``studio/`` (a test checks it).
"""

from __future__ import annotations

import importlib
import json
import logging
import time

log = logging.getLogger(__name__)

# module -> names looked up on it (a lookup is what makes a lazy module import the name's code).
PRELOAD: dict[str, tuple[str, ...]] = {
    "peft.tuners.lora.layer": ("Linear",),
    "torch": (),
    "torch._dynamo": (),
    "torch._dynamo.utils": ("counters",),
    "transformers": (
        "AutoConfig",
        "AutoModelForCausalLM",
        "AutoTokenizer",
        "BitsAndBytesConfig",
        "get_scheduler",
        "LogitsProcessorList",
        "RepetitionPenaltyLogitsProcessor",
        "TemperatureLogitsWarper",
        "TopPLogitsWarper",
        "PreTrainedTokenizerFast",
    ),
    "peft": (
        "LoraConfig",
        "PeftModel",
        "get_peft_model",
        "set_peft_model_state_dict",
    ),
    "peft.tuners.tuners_utils": ("BaseTunerLayer",),
    "peft.utils": ("ModulesToSaveWrapper",),
    "regex": (),
    # studio modules that are imported inside functions (they import the libraries above)
    "studio.export.adapter_import": (),
    "studio.config": (),
    "studio.data.tokens": (),
    "studio.evaluation.heldout": (),
    "studio.evaluation.judge": (),
    "studio.evaluation.task": (),
    "studio.evaluation.checkpoints": (),
    "studio.evaluation.stored": (),
    "studio.export.zips": (),
    "studio.runs.fingerprint": (),
    "studio.planning.hardware": (),
    "studio.planning.memory": (),
    "studio.models": (),
    "studio.planning.planner": (),
    "studio.inference.playground": (),
    "studio.planning.precision": (),
    "studio.runs.registry": (),
    "studio.serving.openai_api": (),
    "studio.training.compiling": (),
    "studio.training.distributed": (),
    "studio.training.loss": (),
}


def preload() -> float:
    """Import every module and name in :data:`PRELOAD`, plus the bundled default model's classes;
    return the seconds it took. Call it on the main thread before serving.

    Example:
        >>> from studio.inference.warmup import preload
        >>> seconds = preload()  # then demo.launch(...)
    """
    start = time.perf_counter()
    for module, names in PRELOAD.items():
        mod = importlib.import_module(module)
        for name in names:
            getattr(mod, name)
    _preload_default_model_classes()
    return time.perf_counter() - start


def _preload_default_model_classes() -> None:
    """The default model's architecture and tokenizer classes live in submodules that
    transformers also imports lazily, on the first load; resolve them now if it is prepared.
    Never converts the model here (that takes about 20 s): `make install` does it."""
    import transformers

    from studio.models import default_model_dir

    folder = default_model_dir()
    names: list[str] = []
    try:
        names += json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures") or []
        tok = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("tokenizer_class")
        names += [tok] if tok else []
    except (OSError, ValueError):
        return  # not prepared yet: the first load imports them, on one thread (the model is converted first)
    for name in names:
        try:
            getattr(transformers, name)
        except AttributeError:  # a class this transformers does not know: its own load will say so
            log.debug("transformers has no %s", name)
