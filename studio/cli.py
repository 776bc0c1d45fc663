"""The page's journey without a browser.

`finetune-studio train | resume | eval | validate | estimate | hardware | export | import | ui | prepare-model`

Every config field is also a flag (``--learning-rate``, ``--lora-r``...), generated from
``RunConfig`` so the CLI, the YAML file and the UI can never drift apart. Flags override the
YAML given with ``--config``. ``estimate`` takes the same flags and estimates the run ``train``
would start with them (through ``planner.settings_for``, as the Train tab and the memory check do).

Example:
    finetune-studio train --data train.csv --model default --method lora --max-steps 50
    finetune-studio estimate --config run.yaml --devices 4 --distributed fsdp
    finetune-studio resume 20261122-153000-lora-train
    finetune-studio eval 20261122-153000-lora-train --rows 50 --json --fail-if-worse
    finetune-studio export 20261122-153000-lora-train --out adapter.zip
    finetune-studio export 20261122-153000-lora-train --merged --out merged.zip
    finetune-studio export 20261122-153000-lora-train --gguf q8_0
    finetune-studio import adapter.zip --name "support bot"
"""

from __future__ import annotations

import argparse
import logging
import sys

from studio.config import ConfigError, RunConfig, field_help, flag_name, leaf_fields
from studio.export.gguf_convert import QUANTS as GGUF_TYPES


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_config_flags(p: argparse.ArgumentParser, aliases: dict[str, str] | None = None) -> None:
    """A flag per config field (``--lora-r``), and ``--config run.yaml`` that the flags override.

    ``aliases`` gives a field a second flag (``{"data.max_length": "--seq-len"}``). A bool flag
    alone means true (``--gradient-checkpointing``); ``--gradient-checkpointing false`` works too.
    """
    p.add_argument("--config", help="YAML run config; flags override its values.")
    for dotted, ftype, default in leaf_fields():
        extra = {"nargs": "?", "const": True} if ftype is bool else {}
        p.add_argument(
            f"--{flag_name(dotted)}",
            *([aliases[dotted]] if aliases and dotted in aliases else []),
            dest=dotted,
            default=None,
            metavar=ftype.__name__.upper(),
            type=_bool if ftype is bool else ftype,
            help=f"{field_help(dotted)} (default: {default})".replace("%", "%%"),  # argparse formats help with %
            **extra,
        )


def _run_config(args, check_data_file: bool = True) -> RunConfig:
    """The RunConfig the flags describe: ``--config``'s YAML (or the defaults), then every flag given.

    Raises:
        ConfigError: every problem with the result.
    """
    cfg = RunConfig.from_yaml(args.config) if args.config else RunConfig()
    overrides = {dotted: getattr(args, dotted) for dotted, _, _ in leaf_fields()}
    return cfg.with_overrides(overrides).check(check_data_file)


def _print_problems(exc: ConfigError) -> int:
    print("The run config has problems:", file=sys.stderr)
    for p in exc.problems:
        print(f"  - {p}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune-studio", description="No-code fine-tuning, from the command line.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="Train a model on a dataset file and save the run.")
    train.add_argument("--runs-dir", help="Folder that holds runs (default ./runs or $FINETUNE_STUDIO_RUNS_DIR).")
    _add_config_flags(train)

    resume = sub.add_parser(
        "resume",
        help="Continue an interrupted or stopped run from its last checkpoint, or a finished one to a new total.",
    )
    resume.add_argument("run", help="Run id (folder name under the runs folder) or run folder path.")
    resume.add_argument("--runs-dir")
    resume.add_argument(
        "--max-steps",
        type=int,
        help="Continue a finished run to this many steps in all (more than its final step): a short "
        "warm-up, then the run's own decay over the added steps.",
    )

    export = sub.add_parser("export", help="Zip a finished run's adapter with its tokenizer, config and model card.")
    export.add_argument("run", help="Run id (its latest version), RUN@vN (a kept version), or a run folder path.")
    export.add_argument("--out", help="Where to write the zip (default: inside the run folder).")
    kind = export.add_mutually_exclusive_group()
    kind.add_argument(
        "--merged",
        action="store_true",
        help="Export the base model with the adapter merged in (a standalone safetensors model).",
    )
    kind.add_argument(
        "--gguf",
        choices=GGUF_TYPES,
        help="Export the merged model as one GGUF file for llama.cpp / Ollama / LM Studio, with an Ollama "
        "Modelfile; the file is read back and compared with the merged model before it is written.",
    )
    export.add_argument("--runs-dir")

    imp = sub.add_parser("import", help="Add an adapter zip (exported here or a zipped PEFT LoRA folder) as a run.")
    imp.add_argument("zip", help="The adapter zip.")
    imp.add_argument("--name", help="Display name for the imported run (default: the zip's run name or file name).")
    imp.add_argument("--max-size-mb", type=float, help="Largest uncompressed size accepted (default 2048).")
    imp.add_argument("--runs-dir")

    val = sub.add_parser(
        "validate",
        help="Check a dataset file and print the report.",
        description="Exit code 0: training can proceed; 1: an error blocks it; 2: the file cannot be read at all.",
    )
    val.add_argument("file", help="CSV, TSV, JSONL, JSON or Parquet file.")
    val.add_argument("--model", default="default", help="Model whose tokenizer and chat template count tokens.")
    val.add_argument("--max-length", type=int, default=RunConfig().data.max_length, help="Max length in tokens.")
    val.add_argument(
        "--mapping",
        nargs="*",
        default=[],
        metavar="COL=ROLE",
        help="Column roles, e.g. question=prompt answer=response (roles: prompt, input, response, "
        "system, messages, text). Default: detect.",
    )
    val.add_argument("--json", action="store_true", help="Print the report as JSON (docs/cli.md lists the fields).")

    hw = sub.add_parser("hardware", help="What this machine has: GPUs, MPS, CPU, RAM, bf16, 4-bit support.")
    hw.add_argument("--json", action="store_true")

    est = sub.add_parser(
        "estimate",
        help="Estimate peak training memory from the model's config alone.",
        description="Takes every flag train takes (and --config run.yaml) and estimates the run they describe, "
        "reading only the model's config.json; no data is read, so rows are taken to be max length long.",
    )
    _add_config_flags(est, aliases={"data.max_length": "--seq-len"})
    est.add_argument("--device", choices=("cpu", "cuda", "mps"), help="Default: this machine's.")
    est.add_argument(
        "--devices",
        type=int,
        default=1,
        metavar="INT",
        help="GPUs the run is launched on (per-device estimate; --distributed says ddp or fsdp).",
    )
    est.add_argument("--json", action="store_true")

    ui = sub.add_parser("ui", help="Start the web studio (same as python app.py).")
    from studio.launch import add_serve_args, add_server_args

    add_server_args(ui)

    srv = sub.add_parser(
        "serve", help="Serve the base model and its trained adapters over an OpenAI-compatible API (/v1)."
    )
    add_serve_args(srv)

    ev = sub.add_parser(
        "eval",
        help="Score a run's generated answers against references, base vs adapter, with 95%% intervals.",
        description="Base and adapter answer the same rows (the run's held-out rows, or --eval-path's); each "
        "metric is reported with bootstrap intervals, the paired adapter-minus-base difference and "
        "win/tie/loss per row. The result is stored under the run folder (evaluations/). Exit code 0: done; "
        "1: --fail-if-worse and the adapter is worse beyond chance; 2: a problem (named in a sentence).",
    )
    ev.add_argument(
        "run", help="Run id (its latest version), RUN@vN (a kept version), RUN@step-N (a checkpoint) or a run folder."
    )
    ev.add_argument(
        "--on-changed-base",
        action="store_true",
        help="Re-evaluate a version whose base model's weights changed since it trained, on the base there is "
        "now, with the settings of its last evaluation (chat and serving refuse such a version).",
    )
    ev.add_argument("--runs-dir")
    ev.add_argument(
        "--against",
        metavar="RUN",
        help="Compare with this adapter (run id or id@step-N, trained the same way on the same base) "
        "instead of the base, on the same rows.",
    )
    ev.add_argument(
        "--eval-path", help="Score this file's rows (CSV, TSV, JSONL, JSON, Parquet) instead of the held-out rows."
    )
    ev.add_argument(
        "--mapping",
        nargs="*",
        default=[],
        metavar="COL=ROLE",
        help="The eval file's column roles, e.g. question=prompt answer=response (default: the run's mapping, "
        "else detected).",
    )
    ev.add_argument(
        "--rows", type=int, metavar="N", help="Score at most N rows, spread evenly (default: all, max 200)."
    )
    ev.add_argument(
        "--metric",
        action="append",
        metavar="NAME",
        help="A metric to report (repeat for several; the first is the primary). Default: picked from the "
        "references' shape.",
    )
    ev.add_argument("--pattern", help="The regular expression a regex metric checks answers against.")
    ev.add_argument("--schema", metavar="FILE_OR_JSON", help="The JSON Schema a JSON metric checks answers against.")
    ev.add_argument(
        "--max-new-tokens", type=int, metavar="N", help="Answer length cap (default: longest reference + 8 tokens)."
    )
    ev.add_argument(
        "--regression-prompts",
        type=int,
        metavar="N",
        help="General prompts that measure how far the adapter moved from the base outside the task "
        "(default 30 of the 100 bundled, spread over their kinds; 0 skips it).",
    )
    ev.add_argument("--json", action="store_true", help="Print the result as one JSON object (docs/cli.md).")
    ev.add_argument(
        "--judge-url",
        metavar="URL",
        help="Also ask an LLM judge: any OpenAI-compatible API's base URL, e.g. http://localhost:11434/v1 (Ollama).",
    )
    ev.add_argument("--judge-model", metavar="NAME", help="The judge model's name as that API knows it.")
    ev.add_argument(
        "--judge-key",
        metavar="KEY",
        help="The judge API's key; better: the FINETUNE_STUDIO_JUDGE_KEY environment variable (a flag shows "
        "in the process list). Sent, never stored.",
    )
    ev.add_argument("--judge-timeout", type=float, metavar="S", help="Seconds per judge reply (default 120).")
    ev.add_argument("--judge-rows", type=int, metavar="N", help="Judge at most N rows (default 100; 4 requests each).")
    ev.add_argument(
        "--checkpoints",
        action="store_true",
        help="Score every checkpoint of the run and its final weights against the base on the same rows, in "
        "one pass, and say which is best at the task (not only on loss).",
    )
    ev.add_argument(
        "--fail-if-worse",
        action="store_true",
        help="Exit 1 when the adapter is worse than the base beyond chance on the primary metric, or on any "
        "metric after Holm's correction.",
    )

    sub.add_parser("prepare-model", help="Convert the bundled default model once (make install runs this).")
    from studio import cli_registry

    cli_registry.add_parsers(sub)
    return parser


def _train(args) -> int:
    from studio.runs.registry import Run, RunRegistry
    from studio.training import distributed

    try:
        cfg = _run_config(args)
        # Under `accelerate launch` every process runs this; rank 0 creates the run folder and
        # the others train into it without writing (see studio/training/distributed.py).
        dist = distributed.from_env(cfg.training.distributed)
    except ConfigError as exc:
        return _print_problems(exc)
    from studio.models import ModelError, resolve

    try:  # an unknown model is refused before a run folder is made for it
        resolve(cfg.model)
    except ModelError as exc:
        print(exc, file=sys.stderr)
        return 2
    distributed.init(dist)
    path = RunRegistry(args.runs_dir).create(cfg).path if dist.main else None
    run = Run(distributed.broadcast(path, dist), writable=dist.main)
    if dist.main:
        print(f"Run folder: {run.path}" + (f" ({dist.world} processes)" if dist.enabled else ""), flush=True)
    try:
        return _run_and_report(cfg, run, resume=False)
    finally:
        if dist.enabled:
            import torch

            torch.distributed.destroy_process_group()


def _resume(args) -> int:
    from studio.runs.registry import Run, RunRegistry
    from studio.training import distributed

    try:
        run = RunRegistry(args.runs_dir).get(args.run)
        cfg = run.config()
        # Under a launcher (a sharded or DDP run is resumed the way it was launched) rank 0
        # judges the run and the others follow its verdict, reading the folder without writing.
        dist = distributed.from_env(cfg.training.distributed)
    except (LookupError, ConfigError) as exc:
        print(exc, file=sys.stderr)
        return 2
    distributed.init(dist)
    try:
        problem = None
        if dist.main:
            run.mark_if_orphaned()  # a run whose process was killed says "running" until now
            problem = run.resume_problem(args.max_steps)
        problem = distributed.broadcast(problem, dist)
        if problem:
            if dist.main:
                print(problem, file=sys.stderr)
            return 2
        run = Run(run.path, writable=dist.main)
        if dist.main:
            point = run.resume_point(args.max_steps)
            processes = f" ({dist.world} processes)" if dist.enabled else ""
            print(f"Run folder: {run.path}{processes}\nResuming from {point.name}", flush=True)
        return _run_and_report(cfg, run, resume=True, continue_to=args.max_steps)
    finally:
        if dist.enabled:
            import torch

            torch.distributed.destroy_process_group()


def _run_and_report(cfg, run, resume: bool, continue_to: int | None = None) -> int:
    import threading

    from studio.runs.records import EvalRecord, Event, Record, TrainRecord
    from studio.training import run_training
    from studio.training.signals import StopOnSignals

    def progress(m: Record) -> None:
        if isinstance(m, TrainRecord):
            print(
                f"step {m.step}/{m.total_steps}  loss {m.loss:.4f}  "
                f"{m.tokens_per_s:.0f} tok/s  rss {m.extra.get('rss_mib', 0):.0f} MiB",
                flush=True,
            )
        elif isinstance(m, EvalRecord):
            print(f"eval at step {m.step}: loss {m.eval_loss:.4f}", flush=True)
        elif isinstance(m, Event) and m.kind == "memory_check":
            print(m.extra["summary"], flush=True)
        elif isinstance(m, Event) and m.kind == "compile":
            print(m.extra["note"], flush=True)
        elif isinstance(m, Event) and m.kind == "continue":
            print(m.extra["schedule"], flush=True)
        elif isinstance(m, Event) and m.kind == "checkpoint":
            print(f"checkpoint saved at step {m.step}", flush=True)

    # Ctrl-C and SIGTERM do what the server's Stop does: finish the step, save, end stopped and
    # resumable (exit 130 / 143); a second Ctrl-C aborts (studio/training/signals.py).
    stop = threading.Event()
    with StopOnSignals(stop, announce=run.writable) as signals:
        status = run_training(cfg, run, stop_event=stop, on_metrics=progress, resume=resume, continue_to=continue_to)
    stopped_by_signal = signals.exit_code if status.state == "finished" and status.stopped else None
    if not run.writable:  # another rank reports; this one only says whether it failed
        return stopped_by_signal or (0 if status.state not in ("failed", "interrupted") else 1)
    print(status.message)
    if stopped_by_signal:
        print(f"Saved: {run.weights_dir()}")
        return stopped_by_signal
    if status.state != "finished":
        print(f"Details: {run.log_path}", file=sys.stderr)
        return 1
    print(f"Saved: {run.weights_dir()}")
    return 0


def _validate(args) -> int:
    import json

    from studio.data import DataError, mapping_for, read_table, validate
    from studio.models import ModelError, load_tokenizer

    def fail(code: str, message: str, exit_code: int) -> int:
        if args.json:
            print(
                json.dumps(
                    {
                        "ok": False,
                        "format": None,
                        "encoding": None,
                        "delimiter": None,
                        "rows": 0,
                        "mapping": {},
                        "findings": [
                            {
                                "severity": "error",
                                "code": code,
                                "message": message,
                                "rows": [],
                                "count": 0,
                                "fix": message,
                            }
                        ],
                        "stats": {},
                    },
                    indent=2,
                )
            )
        else:
            print(f"Error: {message}", file=sys.stderr)
        return exit_code

    try:
        table = read_table(args.file)
    except DataError as exc:
        return fail("unreadable", str(exc), 2)
    try:
        mapping = mapping_for(table.df, args.mapping or "")
    except DataError as exc:
        return fail("unknown_columns", str(exc), 1)
    try:
        tokenizer = load_tokenizer(args.model)
    except ModelError as exc:
        return fail("model", str(exc), 2)
    try:
        report = validate(table, mapping, tokenizer, args.max_length)
    except Exception as exc:  # noqa: BLE001 - whatever the file holds, never a traceback
        return fail("unreadable", f"The file could not be checked ({type(exc).__name__}: {exc}).", 2)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.to_text())
    return 0 if report.ok else 1


def _estimate(args) -> int:
    """The run ``train`` would start with these flags, estimated: the same RunConfig, through
    planner.settings_for like the Train tab's plan and the memory check."""
    import json

    from studio.models import ModelError
    from studio.planning import hardware
    from studio.planning.memory import GIB, estimate, shape_for_model
    from studio.planning.planner import plan, settings_for

    try:
        cfg = _run_config(args, check_data_file=False)  # the data is not read: no file needed
    except ConfigError as exc:
        return _print_problems(exc)
    hw = hardware.detect()
    device = args.device or hw.device
    devices, how = max(args.devices, 1), cfg.training.distributed
    try:
        settings = settings_for(cfg, hw, device, devices=devices, sharded=how == "fsdp")
        shape = shape_for_model(cfg.model, cfg.trust_remote_code)
        est = estimate(shape, cfg.method, settings, device)
    except (ModelError, OSError, ValueError) as exc:
        print(f"Could not estimate: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    # Fit verdicts need the device's free memory, so only for this machine's training device.
    p = plan(shape, hw, settings, device) if device == hw.device else None
    verdict = p.get(cfg.method).verdict if p else None
    fits = None if p is None else verdict in ("fits", "tight")
    if args.json:
        print(
            json.dumps(
                {
                    **est.to_dict(),
                    "fits": fits,
                    "verdict": verdict,
                    "available_bytes": p.available_bytes if p else None,
                    "plan": p.to_dict() if p else None,
                },
                indent=2,
            )
        )
        return 0
    where = f"each of {devices} {device.upper()} devices ({how})" if devices > 1 else device
    print(
        f"{cfg.method} on {where}: about {est.total_bytes / GIB:.2f} GiB peak "
        f"({est.trainable_params:,} trainable of {est.total_params:,} parameters, "
        f"{est.adapter_bytes / 2**20:.0f} MiB saved)"
    )
    for part, n in est.breakdown.items():
        if n:
            print(f"  {part:<22}{n / GIB:>8.2f} GiB")
    if p is None:
        return 0
    print(f"\nOn this machine ({p.available_bytes / GIB:.1f} GiB available on {device.upper()}):")
    for m in p.methods:
        print(f"  {m.method:<6} {m.verdict:<6} {m.reason}")
    print(f"Recommended: {p.recommendation}")
    if p.suggestion:
        print(f"Suggestion: {p.suggestion.text}")
    return 0


def _export(args) -> int:
    from studio.export.gguf_export import export_gguf, read_parity
    from studio.export.gguf_parity import Parity
    from studio.export.zips import ExportError, export_merged, export_zip
    from studio.formatting import format_bytes
    from studio.runs.registry import RunRegistry

    try:
        run = RunRegistry(args.runs_dir).version_view(args.run)
        if args.gguf:
            out = export_gguf(run, args.gguf, args.out)
        else:
            out = (export_merged if args.merged else export_zip)(run, args.out)
    except (LookupError, ValueError, ExportError) as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"Wrote {out} ({format_bytes(out.stat().st_size)})")
    if args.gguf:
        print("Parity with the merged model: " + Parity.from_dict(read_parity(out)).summary())
    return 0


def _import(args) -> int:
    from studio.export.adapter_import import AdapterImportError, import_adapter_zip
    from studio.runs.registry import RunRegistry

    limit = int(args.max_size_mb * 1024**2) if args.max_size_mb else None
    try:
        run = import_adapter_zip(args.zip, RunRegistry(args.runs_dir), name=args.name, max_bytes=limit)
    except AdapterImportError as exc:
        print(exc, file=sys.stderr)
        return 1
    status = run.status()
    print(f"Imported {args.zip} as run {run.id} ({run.name}) on base {status.model}.")
    for warning in status.import_warnings or []:
        print(f"Warning: {warning}", file=sys.stderr)
    print(f"Run folder: {run.path}")
    return 0


def _eval(args) -> int:
    import json
    from pathlib import Path

    from studio.evaluation.judge import JudgeSettings
    from studio.evaluation.task import worse_than_base
    from studio.models import ModelError
    from studio.service import Studio

    schema = args.schema
    if schema and not schema.lstrip().startswith(("{", "[")):
        try:
            schema = Path(schema).read_text(encoding="utf-8")
        except OSError as exc:
            print(f"The schema file {args.schema} cannot be read ({exc.strerror or exc}).", file=sys.stderr)
            return 2

    def progress(done: int, total: int, eta_s: float | None) -> None:
        if not args.json:
            left = f", about {eta_s:.0f} s left" if eta_s is not None else ""
            print(f"{done}/{total} rows answered{left}", file=sys.stderr, flush=True)

    judge = None
    if args.judge_url or args.judge_model:  # checked before any answer is generated
        given = {"timeout_s": args.judge_timeout, "max_rows": args.judge_rows}
        given = {k: v for k, v in given.items() if v is not None}  # else JudgeSettings' defaults
        try:
            judge = JudgeSettings(args.judge_url or "", args.judge_model or "", args.judge_key, **given)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2

    runs_dir = args.runs_dir
    folder = Path(args.run.partition("@")[0])
    if runs_dir is None and (folder / "status.json").is_file():
        runs_dir = folder.parent  # a run folder named outright: its parent is the runs folder
    options = {  # which rows and metrics: the same for one evaluation and for --checkpoints
        "eval_path": args.eval_path,
        "mapping": args.mapping,
        "rows": args.rows,
        "metrics": args.metric,
        "pattern": args.pattern,
        "schema": schema,
        "max_new_tokens": args.max_new_tokens,
    }
    if args.on_changed_base:
        given = [f"--{k.replace('_', '-')}" for k, v in options.items() if v not in (None, "", [])]
        given += [
            f
            for f, v in (("--against", args.against), ("--checkpoints", args.checkpoints), ("--judge-url", judge))
            if v
        ]
        if given:
            print(
                "--on-changed-base repeats the version's last evaluation with its own settings; it does not take "
                f"{', '.join(given)}.",
                file=sys.stderr,
            )
            return 2
    if args.checkpoints:
        return _eval_checkpoints(args, Studio(runs_dir), options, progress, judge)
    try:
        if args.on_changed_base:  # the version's last evaluation again, on the base there is now
            result = Studio(runs_dir).reevaluate(args.run, progress=progress)
        else:
            result = Studio(runs_dir).evaluate_task(
                args.run,
                against=args.against,
                progress=progress,
                judge=judge,
                regression_prompts=args.regression_prompts,
                **options,
            )
    except (LookupError, ValueError, ModelError) as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
        if (result.get("judge") or {}).get("error"):  # the scores stand; say why the judge's are missing
            print(result["judge"]["error"], file=sys.stderr)
    else:
        print(_eval_table(result))
    problem = worse_than_base(result) if args.fail_if_worse else None
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


def _eval_checkpoints(args, studio, options: dict, progress, judge) -> int:
    """``eval RUN --checkpoints``: every checkpoint against the base, and the best one."""
    import json

    from studio.models import ModelError

    clash = [
        flag
        for flag, given in (
            ("--against", args.against),
            ("--judge-url", judge),
            ("--fail-if-worse", args.fail_if_worse),
        )
        if given
    ]
    if "@" in args.run or clash:
        what = ", ".join(clash) if clash else f"a checkpoint ({args.run})"
        print(
            f"--checkpoints scores every checkpoint of a run against the base; it does not take {what}.",
            file=sys.stderr,
        )
        return 2
    try:
        summary = studio.evaluate_checkpoints(args.run, progress=progress, **options)
    except (LookupError, ValueError, ModelError) as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    metric = summary["checkpoints"][0]["metric"]
    print(f"Run {summary['run']}: {summary['rows']} rows, every checkpoint against the base on {metric}\n")
    print(f"{'checkpoint':<14}{'step':>6}  {metric + ' [95%]':<24}{'vs base':>9}  eval loss")
    for c in summary["checkpoints"]:
        score = f"{c['adapter']:.3f} [{c['adapter_ci95'][0]:.2f}, {c['adapter_ci95'][1]:.2f}]"
        loss = f"{c['eval_loss']:.4f}" if c["eval_loss"] is not None else "-"
        mark = "  <- best" if c["checkpoint"] == summary["best"] else ""
        print(f"{c['checkpoint']:<14}{c['step']:>6}  {score:<24}{c['diff']:>+9.3f}  {loss}{mark}")
    print(f"\n{summary['sentence']}")
    return 0


def _eval_table(result: dict) -> str:
    """The evaluation as a few readable lines: the table, the verdicts, where the rows are."""
    from studio.evaluation.judge import describe

    def ci(pair) -> str:
        return f"[{pair[0]:.2f}, {pair[1]:.2f}]"

    version = f" v{result['version']}" if result.get("version") else ""
    lines = [
        f"Run {result['run']}{version}: {result['rows']} rows ({result.get('source', 'held-out rows')}), "
        f"{result['seconds']:.1f} s",
        f"Metrics: {result['reason']}",
        "",
        f"{'metric':<18}{(result.get('against') or 'base')[:19]:<20}{'adapter':<20}{'difference':<22}win/tie/loss",
    ]
    for m in result["metrics"]:
        lines.append(
            f"{m['name']:<18}{m['base']:.2f} {ci(m['base_ci95']):<15}{m['adapter']:.2f} {ci(m['adapter_ci95']):<15}"
            f"{m['diff']:+.2f} {ci(m['diff_ci95']):<16}{m['wins']}/{m['ties']}/{m['losses']}"
        )
    pref = result.get("preference")
    if pref:  # a preference run: chosen over rejected on its held-out pairs, no generation involved
        lines.append(
            f"{'preference acc.':<18}{pref['base']:.2f} {ci(pref['base_ci95']):<15}{pref['adapter']:.2f} "
            f"{ci(pref['adapter_ci95']):<15}{pref['diff']:+.2f} {ci(pref['diff_ci95']):<16}"
            f"{pref['wins']}/{pref['ties']}/{pref['losses']}  ({pref['pairs']} held-out pairs)"
        )
    lines += ["", *([pref["verdict"]] if pref else []), *result["verdicts"]]
    cut = result["cut_share"]
    if cut["base"] or cut["adapter"]:
        lines.append(
            f"Answers cut at {result['max_new_tokens']} tokens: base {cut['base']:.0%}, adapter {cut['adapter']:.0%} "
            "(--max-new-tokens raises the cap)."
        )
    if result.get("regression"):
        lines += ["", result["regression"]["sentence"]]
    lines += describe(result.get("judge"))
    lines.append(f"Every row, both answers and their scores: {result['examples']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from studio.runs.registry import RunsFolderError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return _command(args)
    except RunsFolderError as exc:  # any command given a --runs-dir it cannot create or write
        print(exc, file=sys.stderr)
        return 2


def _command(args) -> int:
    if args.command == "train":
        return _train(args)
    if args.command == "export":
        return _export(args)
    if args.command == "import":
        return _import(args)
    if args.command == "resume":
        return _resume(args)
    if args.command == "validate":
        return _validate(args)
    if args.command == "estimate":
        return _estimate(args)
    if args.command == "eval":
        return _eval(args)
    if args.command in ("versions", "deploy"):
        from studio import cli_registry

        return (cli_registry.versions_command if args.command == "versions" else cli_registry.deploy_command)(args)
    if args.command == "hardware":
        import json

        from studio.planning import hardware

        hw = hardware.detect()
        if args.json:
            print(json.dumps(hw.to_dict(), indent=2))
        else:
            print(hw.summary())
            for device, support in hw.bnb_4bit.items():
                print(f"QLoRA (4-bit) on {device.upper()}: {support}")
        return 0
    if args.command == "prepare-model":
        from studio.models import prepare_default_model

        print(f"Default model ready in {prepare_default_model()}")
        return 0
    if args.command == "ui":
        from studio.ui.server import serve

        return serve(args)
    if args.command == "serve":
        from studio.launch import serve_api

        return serve_api(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
