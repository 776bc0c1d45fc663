"""Package a trained run as a zip that loads in plain PEFT (or transformers, for full runs)."""

from __future__ import annotations

import csv
import io
import os
import zipfile
from pathlib import Path

from studio.models import DEFAULT_MODEL, DEFAULT_MODEL_LABEL
from studio.runs import Run

CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "model_card.md"


class ExportError(RuntimeError):
    """The run cannot be exported; the message says why and what to do."""


def export_zip(run: Run, out: str | Path | None = None) -> Path:
    """Write ``<run id>-adapter.zip`` (or ``out``) holding weights, tokenizer, config, metrics
    and a model card. Built under a temp name and renamed, so a partial zip never appears."""
    status = run.status()
    weights = run.weights_dir()
    if status.get("state") != "finished" or weights is None:
        raise ExportError(f"Run {run.id} is {status.get('state', 'unknown')} and has no finished "
                          "adapter to export; export a finished run.")
    cfg = run.config()
    kind = "model" if cfg.method == "full" else "adapter"
    out = Path(out) if out else run.path / f"{run.id}-{kind}.zip"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(weights.iterdir()):
            # PEFT writes a stub README.md; ours (the model card) replaces it.
            if f.is_file() and not f.name.startswith(".") and f.name != "README.md":
                zf.write(f, f.name)
        zf.writestr("config.yaml", run.config_path.read_text(encoding="utf-8"))
        zf.writestr("metrics.csv", _metrics_csv(run))
        zf.writestr("README.md", model_card(run))
    os.replace(tmp, out)
    return out


def _metrics_csv(run: Run) -> str:
    rows = run.metrics()
    cols = ["kind", "step", "loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "time"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def model_card(run: Run) -> str:
    """The README.md shipped in the zip: what was trained, on what, how well, how to load it."""
    cfg, status = run.config(), run.status()
    base = DEFAULT_MODEL_LABEL if cfg.model == DEFAULT_MODEL else cfg.model
    base_id = "HuggingFaceTB/SmolLM2-135M-Instruct" if cfg.model == DEFAULT_MODEL else cfg.model

    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else ("n/a" if v is None else str(v))

    hyper = "\n".join(f"| `{k}` | {v} |" for k, v in cfg.flat().items() if k not in ("data.path", "data.eval_path"))
    return CARD_TEMPLATE.read_text(encoding="utf-8").format(
        run_id=run.id, base=base, base_id=base_id, method=cfg.method,
        data_file=Path(cfg.data.path).name, train_rows=status.get("train_rows", "n/a"),
        eval_rows=status.get("eval_rows", "n/a"), steps=status.get("step", "n/a"),
        final_loss=fmt(status.get("final_loss")), eval_loss=fmt(status.get("eval_loss")),
        trainable=status.get("trainable_params", "n/a"), hyperparameters=hyper,
        load_snippet=_load_snippet(cfg.method, base_id),
    )


def _load_snippet(method: str, base_id: str) -> str:
    if method == "full":
        return ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                'model = AutoModelForCausalLM.from_pretrained("path/to/unzipped")\n'
                'tokenizer = AutoTokenizer.from_pretrained("path/to/unzipped")')
    return ("from peft import PeftModel\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base_id}")\n'
            'model = PeftModel.from_pretrained(base, "path/to/unzipped")\n'
            'tokenizer = AutoTokenizer.from_pretrained("path/to/unzipped")')

