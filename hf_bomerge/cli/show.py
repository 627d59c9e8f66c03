"""`hf-bomerge show`: the trials of a stored study (or the studies of a storage)."""

from __future__ import annotations

import argparse
import json

DESCRIPTION = "Print the trials of a study (all studies of the storage without --study-name)."


def add_study_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", help="Optuna storage URL (default: the SQLite file under the cache dir)")
    p.add_argument("--study-name", help="default: the only study in the storage")
    p.add_argument("--cache-dir")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="tracebacks for every error")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_study_options(p)


def run(args: argparse.Namespace) -> int:
    from ..searching.study import show_study  # optuna: not for --help

    report = show_study(args.storage, args.study_name, args.cache_dir)
    print(json.dumps(report) if args.json else format_study(report))
    return 0


def format_study(report: dict) -> str:
    """`show_study`'s report as a table."""
    if "studies" in report:
        return "\n".join([f"{len(report['studies'])} studies in {report['storage']}:"] +
                         [f"  {s['study']}  {s['complete']} complete, best {_value(s['best'])}  ({s['source']})"
                          for s in report["studies"]])
    c = report["counts"]
    lines = [f"study {report['study']} in {report['storage']} ({report['source']}, {report['search']}):",
             f"  {c['complete']} complete, {c['running']} running, {c['waiting']} queued, {c['failed']} failed",
             "", f"  {'#':>4}  {'state':<8} {report['objective'][:9]:>9}  {'baseline':<12} weights (oldest first)"]
    for t in report["trials"]:
        weights = " ".join(f"{w:.3f}" for w in t["weights"]) if t["weights"] else ""
        lines.append(f"  {t['number']:>4}  {t['state']:<8} {_value(t['loss']):>9}  {t['seed'] or '':<12} {weights}")
    if report["best"]:
        lines += ["", f"best: trial {report['best']['number']} {report['objective']} {report['best']['loss']:.5f}"]
    for e in report["exports"]:
        lines.append(f"exported at {e['budget']} trials by {e.get('worker')} to {e.get('output')} "
                     f"({'done ' + e['done'] if e.get('done') else 'not finished'})")
    return "\n".join(lines)


def _value(v) -> str:
    return "-" if v is None else f"{v:.5f}"
