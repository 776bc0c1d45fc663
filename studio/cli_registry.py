"""`finetune-studio versions` and `finetune-studio deploy`: a run's kept versions and the named
deployments that point at them, from the command line. They read and write the runs folder the
servers read (studio/runs/versions.py, studio/runs/deployments.py), so a `deploy set` here is what
the next request to a running `serve` or UI server gets. No model is loaded: they answer at once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from studio.formatting import format_bytes
from studio.runs import versions
from studio.runs.deployments import DeploymentError, Deployments
from studio.runs.registry import RunRegistry

RUNS_DIR_HELP = "Folder that holds runs (default ./runs or $FINETUNE_STUDIO_RUNS_DIR)."


def add_parsers(sub) -> None:
    ver = sub.add_parser(
        "versions",
        help="List a run's kept versions (v1, v2, ...) with their lineage, disk use and deployments.",
    )
    ver.add_argument("run", help="Run id (folder name under the runs folder) or run folder path.")
    ver.add_argument("--delete", metavar="vN", help="Delete this version (never the latest or a deployed one).")
    ver.add_argument("--json", action="store_true", help="Print the versions as JSON.")
    ver.add_argument("--runs-dir", help=RUNS_DIR_HELP)

    dep = sub.add_parser(
        "deploy",
        help="Named deployments: point a name (support-bot) at an adapter version, roll back, list, history.",
        description='A deployment is a name a client asks for (model="support-bot" in /v1) that points at one '
        "adapter version (RUN@vN). Every server on the same runs folder follows a change at its next request.",
    )
    actions = dep.add_subparsers(dest="action", required=True)
    dset = actions.add_parser("set", help="Point NAME at RUN@vN (RUN alone: its latest version), creating it.")
    dset.add_argument("name", help="The deployment's name: letters, digits, '.', '_' or '-'.")
    dset.add_argument("ref", help="RUN@vN, or RUN for its latest version (recorded as the number it is now).")
    dset.add_argument("--why", default="", help="Why (kept in the history).")
    back = actions.add_parser("rollback", help="Point NAME back at the version it held before.")
    back.add_argument("name")
    back.add_argument("--why", default="", help="Why (kept in the history).")
    listing = actions.add_parser("list", help="Every deployment and the version it points at.")
    listing.add_argument("--json", action="store_true")
    hist = actions.add_parser("history", help="Every change of NAME: when, from, to, why.")
    hist.add_argument("name")
    hist.add_argument("--json", action="store_true")
    for p in (dset, back, listing, hist):
        p.add_argument("--runs-dir", help=RUNS_DIR_HELP)


def versions_command(args: argparse.Namespace) -> int:
    registry = RunRegistry(args.runs_dir)
    try:
        run = registry.get(args.run.partition("@")[0])
    except LookupError as exc:
        print(exc, file=sys.stderr)
        return 2
    deployments = Deployments(registry)
    if args.delete:
        number = versions.number_of(args.delete.strip().lower()) or versions.number_of(f"v{args.delete.strip()}")
        if number is None:
            print(f"--delete takes a version such as v2 (got {args.delete!r}).", file=sys.stderr)
            return 2
        try:
            gone = run.delete_version(number, deployments.holding(run.id, number))
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"Deleted {run.id}@{gone.label} ({format_bytes(gone.record.get('disk_bytes') or 0)} freed).")
        return 0
    rows = deployments.version_rows(run)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print(f"Run {run.id} has no saved version yet (it is {run.status().state}).")
        return 0
    print(f"{'version':<9}{'kind':<11}{'from':<6}{'step':>6}  {'saved':<17}{'disk':>10}  {'eval loss':>9}  deployed as")
    for r in rows:
        print(
            f"{r['version']:<9}{r['kind'] or '?':<11}{r['parent'] or '-':<6}{r['step'] or 0:>6}  {r['saved']:<17}"
            f"{format_bytes(r['disk_bytes']):>10}  {_num(r['eval_loss']):>9}  {', '.join(r['deployed_as']) or '-'}"
        )
        for key, old, new in r["changed"]:
            print(f"{'':<9}changed {key}: {old} -> {new}")
        for score in r["scores"][:1]:
            print(f"{'':<9}scored {score}")
    return 0


def _num(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def deploy_command(args: argparse.Namespace) -> int:
    deployments = Deployments(RunRegistry(args.runs_dir))
    try:
        if args.action == "set":
            before = deployments.get(args.name)
            d = deployments.set(args.name, args.ref, args.why)
            was = f" (was {before.ref})" if before else ""
            print(f"{d.name} -> {d.ref}{was}")
            return 0
        if args.action == "rollback":
            d = deployments.rollback(args.name, args.why)
            print(f"{d.name} -> {d.ref} (rolled back from {d.history[-1]['from']})")
            return 0
    except DeploymentError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.action == "list":
        found = deployments.list()
        if args.json:
            print(json.dumps([{"name": d.name, "ref": d.ref, "updated_at": d.updated_at} for d in found], indent=2))
        elif not found:
            print("No deployments yet: `finetune-studio deploy set NAME RUN@vN` makes one.")
        for d in [] if args.json else found:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(d.updated_at))
            print(f"{d.name:<24}{d.ref:<60}{when}")
        return 0
    d = deployments.get(args.name)
    if d is None:
        print(f"There is no deployment called {args.name!r}; `deploy list` shows them.", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(d.history, indent=2))
        return 0
    for e in d.history:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"]))
        why = f"  ({e['why']})" if e.get("why") else ""
        print(f"{when}  {e['action']:<9}{e.get('from') or '-'} -> {e['to']}{why}")
    return 0
