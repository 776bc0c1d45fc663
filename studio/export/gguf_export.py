"""Export a finished run as ``<run id>-v<version>-<type>.gguf.zip`` for llama.cpp, Ollama and LM Studio.

The zip holds:
    <run id>-v<version>-<type>.gguf   the merged model: weights, tokenizer, the run's chat template
    Modelfile                         for ``ollama create``: TEMPLATE, SYSTEM, stop tokens, sampling
    README.md                         how to run it, and the parity numbers
    parity.json                       the same numbers, for tools
    config.yaml                       how the run was trained

Steps: the merged model (the merged export's merge, checked against base + adapter; a full
fine-tune is its own merged model) -> GGUF (``gguf_convert``) -> read back and compared on
held-out prompts (``gguf_parity``). A file that fails the comparison is not offered: the export
raises ExportError with the measured numbers.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

from studio.data import DataError, Example, prepare
from studio.export.chat_format import NoRoleFormat, RoleFormat, modelfile, role_format, stop_strings
from studio.export.gguf_convert import (
    GgufError,
    GgufInfo,
    check_quant,
    pre_tokenizer_name,
    supported_architecture,
    write_gguf,
)
from studio.export.gguf_parity import Parity, check
from studio.export.zips import ExportError, artifact_name, finished_weights, merge_into, newest_input, write_zip
from studio.formatting import markdown_cell, slug
from studio.runs.registry import Run

log = logging.getLogger(__name__)

DEFAULT_QUANT = "q8_0"
PARITY_JSON = "parity.json"
PARITY_PROMPTS = 3
FALLBACK_PROMPTS = ("What is 2 plus 3?", "Name three colours.", "Write one sentence about the sea.")
# The studio's Chat tab decodes greedily with no repetition penalty; the Modelfile starts the same.
OLLAMA_PARAMS = {"temperature": 0, "top_p": 1, "repeat_penalty": 1}


def gguf_name(run: Run, quant: str) -> str:
    return artifact_name(run, f"{quant}.gguf")


def export_gguf(run: Run, quant: str = DEFAULT_QUANT, out: str | Path | None = None) -> Path:
    """Write the GGUF zip (in the run folder, or ``out``) and return its path. A zip already built
    for this version and type, newer than the run's files, is reused.

    Raises:
        ExportError: the run is not finished, its model or tokenizer cannot be written as GGUF,
            or the written file does not answer like the merged model (the message has the numbers).
    """
    try:
        check_quant(quant)
    except GgufError as exc:
        raise ExportError(str(exc)) from None
    weights = finished_weights(run)
    default_out = run.path / gguf_name(run, quant)
    out = Path(out) if out else default_out
    if out == default_out and out.exists() and out.stat().st_mtime >= newest_input(run, weights):
        return out
    cfg = run.config()
    started = time.monotonic()
    tokenizer = _refuse_unsupported(run, weights)  # before the merge, which takes a while
    work = Path(tempfile.mkdtemp(prefix=".gguf-", dir=run.path))
    try:
        if cfg.method == "full":
            merged_dir, merge_note = weights, "A full fine-tune: the trained model itself, no merge needed."
        else:
            merged_dir = work / "merged"
            merged_dir.mkdir()
            merge_note = merge_into(run, weights, merged_dir)
        plain_text, system, held_out = _training_data(run, tokenizer)
        fmt, why_not = (None, "this run trained on plain text, not chat turns") if plain_text else _format(tokenizer)
        stops = stop_strings(fmt, tokenizer)
        stop_ids = [i for i in tokenizer.convert_tokens_to_ids(stops) if i is not None and i != tokenizer.unk_token_id]
        file_name = Path(gguf_name(run, quant)).stem  # "<run>-v<n>-<quant>.gguf"
        try:
            info = write_gguf(
                merged_dir,
                work / file_name,
                quant,
                name=f"{run.name} v{max(run.version, 1)}",
                chat_template=tokenizer.chat_template,
                add_bos=False,  # training never let the tokenizer add BOS; the template writes what it needs
                end_of_turn_id=stop_ids[0] if stop_ids else None,
            )
        except GgufError as exc:
            raise ExportError(str(exc)) from None
        written = time.monotonic()
        parity = check(
            merged_dir,
            info.path,
            info.architecture,
            quant,
            _prompts(held_out, tokenizer, plain_text),
            stop_ids,
            tokenizer.chat_template,
        )
        checked = time.monotonic()
        if not parity.passed:
            raise ExportError(
                f"The GGUF was written but is not offered: {'; '.join(parity.problems)}. ({parity.summary()})"
            )
        system = system or (fmt.default_system if fmt else None)
        model_file = modelfile(info.path.name, fmt, why_not, stops, system, OLLAMA_PARAMS, plain_text=plain_text)
        timings = {"convert_s": round(written - started, 1), "parity_s": round(checked - written, 1)}
        readme = _readme(run, info, parity, merge_note, fmt, why_not, stops, timings)

        def fill(zf: zipfile.ZipFile) -> None:
            zf.write(info.path, info.path.name, compress_type=zipfile.ZIP_STORED)  # GGUF barely compresses
            zf.writestr("Modelfile", model_file)
            zf.writestr("README.md", readme)
            zf.writestr(PARITY_JSON, json.dumps({**parity.to_dict(), **timings, "bytes": info.bytes}, indent=2))
            zf.writestr("config.yaml", run.config_path.read_text(encoding="utf-8"))

        return write_zip(out, fill)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def read_parity(zip_path: str | Path) -> dict:
    """The parity numbers stored in a GGUF zip."""
    with zipfile.ZipFile(zip_path) as zf:
        return json.loads(zf.read(PARITY_JSON))


def _refuse_unsupported(run: Run, weights: Path):
    """ExportError unless the run's model and tokenizer can be written as GGUF; the run's tokenizer
    (with the chat template it trained with) when they can."""
    from transformers import AutoConfig

    from studio import models

    cfg = run.config()
    has_tokenizer = (weights / "tokenizer_config.json").is_file()
    try:
        source = str(weights) if cfg.method == "full" else models.resolve(cfg.model)
        config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code).to_dict()
        # ChatML where the run has no template, as in training.
        tokenizer = models.load_tokenizer(str(weights) if has_tokenizer else cfg.model, cfg.trust_remote_code)
    except (models.ModelError, OSError) as exc:
        raise ExportError(f"Cannot export: the base model is not available here. {exc}") from None
    try:
        supported_architecture(config)
        pre_tokenizer_name(tokenizer)
    except GgufError as exc:
        raise ExportError(str(exc)) from None
    return tokenizer


def _format(tokenizer) -> tuple[RoleFormat | None, str | None]:
    try:
        return role_format(tokenizer), None
    except NoRoleFormat as exc:
        return None, str(exc)


def _training_data(run: Run, tokenizer) -> tuple[bool, str | None, list[Example]]:
    """From one read of the run's data file: whether it trained on plain text, the system prompt
    every training conversation had (if they all had the same one), and a few held-out rows.
    (False, None, []) when the data is not here any more (imported runs, a deleted file)."""
    cfg = run.config()
    if run.status().imported or not cfg.data.path:
        return False, None, []
    try:
        data = prepare(cfg.data, tokenizer, cfg.training.seed)  # the split training made
    except (DataError, OSError):
        return False, None, []
    held_out = data.eval[:PARITY_PROMPTS]
    if data.report.mapping.format == "text":
        return True, None, held_out
    convs = [c for c in data.report.convs if c]
    systems = {c[0]["content"] if c[0]["role"] == "system" else None for c in convs}
    return False, (systems.pop() if len(systems) == 1 else None), held_out


def _prompts(held_out: list[Example], tokenizer, plain_text: bool) -> list[list[int]]:
    """The held-out prompts as training templated them (for plain text, the first half of each
    held-out text); generic ones when the run has none."""
    from studio.evaluation.heldout import prompt_and_reference

    if plain_text:
        prompts = [r.input_ids[: max(1, len(r.input_ids) // 2)] for r in held_out]
        fallback = list(FALLBACK_PROMPTS)
    else:
        prompts = [prompt_and_reference(r)[0] for r in held_out]
        fallback = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in FALLBACK_PROMPTS
        ]
    prompts = [p for p in prompts if p]
    return prompts or [tokenizer(text, add_special_tokens=False)["input_ids"] for text in fallback]


def _readme(run, info: GgufInfo, parity: Parity, merge_note: str, fmt, why_not, stops, timings) -> str:
    name = info.path.name
    model = slug(run.name, fallback="finetuned").lower()  # Ollama names are lowercase
    rows = "\n".join(
        "| "
        + " | ".join(markdown_cell(c) for c in (p.prompt[-120:], p.answer, p.gguf_answer, "yes" if p.same else "no"))
        + " |"
        for p in parity.prompts
    )
    template_note = (
        "The Modelfile's TEMPLATE is the run's chat template written as a Go template; it was checked to "
        "render probe conversations exactly as the training template does."
        if fmt is not None
        else f"The Modelfile has no TEMPLATE: {why_not}."
    )
    return f"""# {run.name} (v{max(run.version, 1)}) as GGUF ({info.quant})

`{name}` is the fine-tuned model in one file for llama.cpp, Ollama and LM Studio: {info.tensors}
tensors, {info.bytes / 2**20:.1f} MiB, architecture `{info.architecture}`, tokenizer pre-split
`{info.pre_tokenizer}`. The file stores the run's chat template (`tokenizer.chat_template`) and
its special tokens; a turn ends at {", ".join(f"`{s}`" for s in stops)}.

## Run it

llama.cpp (the chat template in the file is used with `--jinja`):

    llama-cli -m {name} --jinja -cnv
    llama-server -m {name} --jinja --port 8080

Ollama (from this folder):

    ollama create {model} -f Modelfile
    ollama run {model}

{template_note} Sampling starts greedy (temperature 0), like the studio's Chat tab; raise
`temperature` in the Modelfile for more varied answers.

## Does it answer like the trained model?

Before this zip was offered, the GGUF was read back with transformers (an independent reader) and
compared with the merged model on {len(parity.prompts)} held-out prompts:

- {parity.summary()}.
- Tokenizer: {"same token ids" if parity.tokenizer_same else "DIFFERENT token ids"} for every prompt;
  chat template: {"identical" if parity.template_same else "DIFFERENT"}.
- "File layout exact" compares the read-back logits with the merged model's weights rounded exactly as
  {info.quant} rounds them: it measures the file, not the quantisation (float32 noise is about 1e-6).

| prompt (end) | merged model | this GGUF | same |
|---|---|---|---|
{rows}

Conversion took {timings["convert_s"]} s and the check {timings["parity_s"]} s.

{merge_note}
"""
