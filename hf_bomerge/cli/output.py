"""What every command that produces a merge shares: the output options, writing (and pushing) the merge once,
and the report (a human summary; under --json one object on stdout's last line)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ..comparisons import comparisons, loss_part
from ..defaults import DEFAULT_MAX_SHARD_SIZE
from ..objectives import objective_class
from . import options


def add_output_options(p: argparse.ArgumentParser, *, dtype: bool = False) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--output", help="default ./<model-name>-bomerge")
    g.add_argument("--overwrite", action="store_true")
    if dtype:
        options.add(g, "dtype")
    g.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="largest weight file written "
                   "(default: %(default)s)")
    g.add_argument("--save-dcp", action="store_true", help="also write the merge as a distributed checkpoint in the "
                   "run's own names (OUTPUT/dcp/, model state only), to resume training from (DCP sources)")
    g.add_argument("--push-to-hub", metavar="REPO_ID", help="publish the merged model to this Hub repo")
    g.add_argument("--private", action="store_true", help="create the Hub repo private")
    g.add_argument("--hub-revision", metavar="BRANCH", help="push to this branch (created if missing)")
    g.add_argument("--commit-message")
    g.add_argument("--token", help="Hub token (default: HF_TOKEN or the login cache); never printed")


def add_common_options(g) -> None:
    """--cache-dir, --json, --quiet, --debug (every command has them)."""
    g.add_argument("--cache-dir", help="downloads, tokenized held-out data and the default study storage")
    g.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--debug", action="store_true", help="tracebacks for every error")


def finish(result, args: argparse.Namespace, default_name: str, claim: bool = True) -> int:
    """Write (and push) `result`, then report it."""
    written = save(result, args, default_name, claim)
    if written is not None:
        report(written, args)
    return 0


def save(result, args, default_name: str, claim: bool = True):
    """Write (and push) the merge through `export.export_once`: for a search, exactly one worker writes once
    the budget is spent; the others say where it went. None on a process that does not write (not the main
    one under `accelerate launch`)."""
    from ..objectives import parallel  # heavy (torch): only when a merge is written
    from ..publish.export import export_once  # heavy (torch): only when a merge is written

    if not parallel.is_main():  # under `accelerate launch`, only the main process writes
        return None
    done = export_once(result, args.output or default_name, repo_id=args.push_to_hub, token=args.token,
                       private=args.private or None, revision=args.hub_revision, commit_message=args.commit_message,
                       claim=claim, overwrite=args.overwrite, max_shard_size=args.max_shard_size, progress=not args.quiet,
                       save_dcp=getattr(args, "save_dcp", False))
    if done.writer is not None:
        from ..searching.study import safe_url  # optuna: only for a search's study

        w = done.writer
        print(f"hf-bomerge: the budget of {result.workspace.budget} trials of study {result.study} is spent and its merge "
              f"is exported by {w.get('worker')} (to {w.get('output')}, since {w.get('at')}"
              f"{'' if w.get('done') else ', maybe still running'}); this run writes nothing. To write it "
              f"again: hf-bomerge export --storage {safe_url(result.workspace.storage)} --study-name {result.study} "
              "--output DIR",
              file=sys.stderr)
    if done.url:
        print(f"pushed to {done.url}", file=sys.stderr)
    return dataclasses.replace(result, output=done.output)


def report(result, args) -> None:
    """The human summary (stderr under --json) and the JSON object on stdout's last line."""
    out = sys.stderr if args.json else sys.stdout
    print(format_summary(result), file=out)
    if args.json:
        print(json.dumps(result.summary()), flush=True)


def format_summary(result) -> str:
    """The merge's weights, its numbers on every set it was scored on, and then every comparison, said the same
    way whether the merge wins or loses (`hf_bomerge.comparisons`)."""
    lines = [f"merged {len(result.revisions)} revisions of {result.source} -> {result.output}", "", "weights:"]
    lines += [f"  {name:<24} {w:9.5f}" for name, w in zip(result.revisions, result.weights)]
    if result.layer_weights:
        lines[-len(result.weights) - 1] = "weights (the mean over depth groups, weighted by their parameter counts):"
        lines += ["", "weights per depth group (oldest revision first):"]
        lines += [f"  {group:<24} " + " ".join(f"{w:7.4f}" for w in vector)
                  for group, vector in result.layer_weights.items()]
    if result.loss is not None:
        lines += ["", *_scores(result)]
    lines += _confirmation(result)
    for name, row in result.generalization.items():
        lines += ["", f"generalization (loss) on {name}: merged {row['merged']:.5f}, best single "
                  f"({row['best_single_revision']}) {row['best_single']:.5f}, uniform {row['uniform']:.5f}"]
    if result.duplicates:
        lines += ["", *result.duplicates.sentences()]
    lines += _phase(result)
    said = comparisons(result)
    if said:
        lines += ["", *said]
    c = result.confirm
    if c and c.exported != "merge":
        lines.append(f"--fallback: the output holds {c.exported}, not the searched merge")
    elif c and c.verdict == "not better":
        lines.append("pass --fallback to export that baseline instead")
    return "\n".join(lines)


def _phase(result) -> list[str]:
    """Where in training the window lies, when it matters (a decay, early training), and revisions that jump."""
    said = result.phase.sentences() if result.phase else []
    return ["", *said] if said else []


def _confirmation(result) -> list[str]:
    """The confirm part's numbers, never seen by the search."""
    c = result.confirm
    if not c:
        return []
    return ["", f"on the confirm part ({c.units} {c.unit} the search never saw):",
            *(f"  {k:<24} {v:9.5f}" for k, v in {"merged": c.loss, **c.baselines}.items())]


def _scores(result) -> list[str]:
    """The merge and the baselines on the objective: loss with perplexity, or the metric."""
    kind = objective_class(result.objective)
    read = f"{result.eval_questions} {kind.confirm_units}" if result.eval_questions else f"{result.eval_tokens} tokens"
    dtype = f", computed in {result.eval_dtype}" if result.eval_dtype else ""
    title = result.objective if kind.layout == "loss" else kind.header(result.objective)
    ppl = {k: kind.perplexity(v) for k, v in {"merged": result.loss, **result.baselines}.items()}
    return [f"held-out {title} on {result.dataset}, {loss_part(result)} ({read}{dtype}):",
            *(f"  {k:<24} {v:9.5f}" + (f"  (ppl {ppl[k]:.3f})" if ppl[k] is not None else "")
              for k, v in {"merged": result.loss, **result.baselines}.items())]
