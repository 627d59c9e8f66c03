"""`hf-bomerge`: a thin shell over the Python API (see DESIGN.md for the contract)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

# Before torch is imported: idle OpenMP threads sleep instead of spinning, which keeps a busy 2-core machine
# from slowing the merge down ~2x (measured in benchmarks/README.md); no effect on a quiet machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import __version__  # noqa: E402
from .errors import BOMergeError  # noqa: E402
from .engine import DEFAULT_MAX_SHARD_SIZE  # noqa: E402
from .heldout import DEFAULT_MAX_EVAL_TOKENS, perplexity  # noqa: E402
from .study import SEARCHES, best_of, direction  # noqa: E402

DEMO_REVISIONS = "last:4"
EPILOG = """examples:
  hf-bomerge EleutherAI/pythia-1b --revisions step100000..step143000
  hf-bomerge EleutherAI/pythia-160m --revisions last:2 --search pairwise --trials 12 --json
  hf-bomerge ./trainer-output --revisions checkpoint-1000.. --method ema
  hf-bomerge ./trainer-output --objective ./metrics/accuracy --dataset questions.jsonl
  hf-bomerge --recipe merged/bomerge_recipe.yaml --output again
  hf-bomerge demo
  hf-bomerge show --storage postgresql+psycopg://db-host/bomerge         (a study's trials)
  hf-bomerge export --storage postgresql+psycopg://db-host/bomerge --output merged
  hf-bomerge download EleutherAI/pythia-1b --revisions last:4    (then run offline: HF_HUB_OFFLINE=1)"""
SUBCOMMANDS = ("show", "export")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hf-bomerge", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Merge intermediate checkpoints of one pretraining run with weights found by Bayesian "
                    "optimization on held-out loss (or an `evaluate` metric). SOURCE is a Hub repo id, a "
                    "folder of checkpoints or a local git repository; `demo` runs the built-in offline demo.")
    p.add_argument("source", nargs="?", help="Hub repo id ORG/NAME, a local folder, or `demo`")
    p.add_argument("--version", action="version", version=f"hf-bomerge {__version__}")
    g = p.add_argument_group("revisions")
    g.add_argument("--revisions", default="last:2",
                   help="A..B (training order, ends inclusive), R1,R2,..., or last:N (default: last:2)")
    g.add_argument("--max-checkpoints", type=int, default=8, help="keep K evenly spaced (default 8; 0 = all)")
    g = p.add_argument_group("held-out data")
    g.add_argument("--dataset", help="Hub dataset id or local file/folder (default Salesforce/wikitext)")
    g.add_argument("--dataset-config", help="dataset config (default wikitext-2-raw-v1 for the default dataset)")
    g.add_argument("--split", help="split (default validation; a local file is its own single split)")
    g.add_argument("--text-column", default="text")
    g.add_argument("--eval-dataset", action="append", default=[], metavar="DATASET[:CONFIG][@SPLIT]",
                   help="extra set for the generalization report (repeatable; or a local file)")
    g.add_argument("--max-eval-tokens", type=int, default=DEFAULT_MAX_EVAL_TOKENS,
                   help="cap on the tokens evaluated: the held-out text for loss; for a metric, the first "
                        "questions whose question+choice sequences (all choices) fit in it (default %(default)s)")
    g.add_argument("--block-size", type=int, help="default: min(model context, 2048)")
    g.add_argument("--batch-size", type=int, default=4,
                   help="blocks per forward pass (a metric: as many question+choice sequences as fit in "
                        "batch-size x block-size tokens; default 4)")
    g.add_argument("--eval-dtype", choices=["float32", "float16", "bfloat16"],
                   help="default float32 on CPU, the checkpoint dtype on CUDA")
    g.add_argument("--objective", default="loss", metavar="loss|METRIC",
                   help="loss (mean token NLL, minimized; default), or an `evaluate` metric name or local path "
                        "(maximized) graded on multiple-choice rows: --dataset with columns question, choices "
                        "(list) and answer (index or text); each choice scored by its log-likelihood")
    g = p.add_argument_group("search")
    g.add_argument("--search", choices=SEARCHES, default="auto")
    g.add_argument("--trials", type=int, default=20, help="total COMPLETE trials of the study, seeds included")
    g.add_argument("--lambda-min", type=float, default=0.0, help="pairwise lower bound of λ (default 0.0)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--storage", help="Optuna storage URL (default: SQLite under the cache dir)")
    g.add_argument("--study-name", help="default: derived from the inputs")
    g = p.add_argument_group("fixed merges (no search)")
    g.add_argument("--weights", help="W1,W2,... one per revision, oldest first")
    g.add_argument("--method", choices=["sma", "ema", "wma"])
    g.add_argument("--ema-alpha", type=float, default=0.2)
    g.add_argument("--allow-extrapolation", action="store_true", help="allow negative/unnormalized weights")
    g.add_argument("--no-eval", action="store_true", help="fixed merges: skip the held-out evaluation")
    g.add_argument("--tokenizer", metavar="REPO_OR_PATH", help="tokenizer for the evaluation and the merge, when the "
                   "checkpoints have none (default: the latest revision's, else main's / the folder root's)")
    g.add_argument("--recipe", help="reproduce the merge of a bomerge_recipe.yaml exactly, no search")
    g = p.add_argument_group("output")
    g.add_argument("--output", help="default ./<model-name>-bomerge")
    g.add_argument("--overwrite", action="store_true")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: the checkpoints' dtype")
    g.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE)
    g.add_argument("--push-to-hub", metavar="REPO_ID", help="publish the merged model to this Hub repo")
    g.add_argument("--private", action="store_true", help="create the Hub repo private")
    g.add_argument("--hub-revision", metavar="BRANCH", help="push to this branch (created if missing)")
    g.add_argument("--commit-message")
    g.add_argument("--token", help="Hub token (default: HF_TOKEN or the login cache); never printed")
    g = p.add_argument_group("other")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument("--device-map", choices=["auto", "balanced", "balanced_low_0", "sequential"],
                   help="spread the model (and each device's share of the checkpoints) over all visible GPUs "
                        "with Accelerate; default: the whole model on --device")
    g.add_argument("--max-memory", help="memory the run may use per device, e.g. 20GB (default: what is free)")
    g.add_argument("--cache-dir", help="downloads, tokenized held-out data and the default study storage")
    g.add_argument("--trust-remote-code", action="store_true", help="run the repo's own model code (off by default)")
    g.add_argument("--dry-run", action="store_true", help="resolve the revisions and print the plan only")
    g.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--debug", action="store_true", help="tracebacks for every error")
    return p


def build_study_parser(command: str) -> argparse.ArgumentParser:
    """`show` prints a study's trials; `export` writes (and pushes) the best merge of an existing study."""
    what = {"show": "Print the trials of a study (all studies of the storage without --study-name).",
            "export": "Write the best merge of an existing study (e.g. one that several workers ran)."}[command]
    p = argparse.ArgumentParser(prog=f"hf-bomerge {command}", description=what)
    p.add_argument("--storage", help="Optuna storage URL (default: the SQLite file under the cache dir)")
    p.add_argument("--study-name", help="default: the only study in the storage")
    p.add_argument("--cache-dir")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    p.add_argument("--debug", action="store_true")
    if command == "export":
        p.add_argument("--output", help="default ./<model-name>-bomerge")
        p.add_argument("--overwrite", action="store_true")
        p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE)
        p.add_argument("--push-to-hub", metavar="REPO_ID")
        p.add_argument("--private", action="store_true")
        p.add_argument("--hub-revision", metavar="BRANCH")
        p.add_argument("--commit-message")
        p.add_argument("--token", help="Hub token (default: HF_TOKEN or the login cache); never printed")
        p.add_argument("--quiet", action="store_true")
    p.set_defaults(command=command, quiet=True, dry_run=False, source=None, recipe=None)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "download":
        from .download import main as download

        logging.basicConfig(level=logging.DEBUG if "--debug" in argv else logging.WARNING, stream=sys.stderr)
        return download(argv[1:])
    if argv and argv[0] in SUBCOMMANDS:
        args = build_study_parser(argv[0]).parse_args(argv[1:])
    else:
        args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's SIGTERM ends the run like Ctrl-C
    try:
        return _main(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, stream=sys.stderr)
    try:
        result = run(args)
    except BOMergeError as err:
        if args.debug:
            raise
        print(f"hf-bomerge: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hf-bomerge: interrupted. Finished trials are saved in the study and no output folder was "
              "left half-written; run the same command again to resume.", file=sys.stderr)
        return 130
    if result is not None:
        report(result, args)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args: argparse.Namespace):
    from . import api

    progress = not args.quiet
    if getattr(args, "command", None) == "show":
        return _show(args)
    if getattr(args, "command", None) == "export":
        result = api.from_study(args.study_name, args.storage, token=args.token, cache_dir=args.cache_dir,
                                progress=progress)
        return _save(result, args, default_name=Path(result.source.rstrip("/")).name + "-bomerge", claim=False)
    if args.recipe:
        result = api.from_recipe(args.recipe, token=args.token, cache_dir=args.cache_dir, progress=progress)
        return _save(result, args, default_name=Path(args.recipe).resolve().parent.name + "-reproduced")
    if args.source is None:
        raise BOMergeError("Give a SOURCE (a Hub repo id such as EleutherAI/pythia-160m, or a folder of "
                           "checkpoints), `--recipe FILE`, or `demo`. See hf-bomerge --help.")
    if args.source == "demo":
        return _demo(args)
    if args.dry_run:
        return _dry_run(args)
    common = dict(dataset=args.dataset, dataset_config=args.dataset_config, split=args.split,
                  text_column=args.text_column, max_eval_tokens=args.max_eval_tokens, block_size=args.block_size,
                  batch_size=args.batch_size, eval_dtype=args.eval_dtype, device=args.device, token=args.token,
                  cache_dir=args.cache_dir, trust_remote_code=args.trust_remote_code, progress=progress,
                  max_checkpoints=args.max_checkpoints, ema_alpha=args.ema_alpha, dtype=args.dtype,
                  max_memory=args.max_memory, device_map=args.device_map, objective=args.objective,
                  tokenizer=args.tokenizer)
    if args.weights or args.method:
        from .weights import parse_weights

        weights = parse_weights(args.weights) if args.weights else None
        result = api.merge(args.source, args.revisions, weights=weights, method=args.method,
                           allow_extrapolation=args.allow_extrapolation, evaluate=not args.no_eval, **common)
    else:
        result = api.search(args.source, args.revisions, eval_datasets=args.eval_dataset, search=args.search,
                            trials=args.trials, lambda_min=args.lambda_min, seed=args.seed, storage=args.storage,
                            study_name=args.study_name, **common)
    return _save(result, args, default_name=Path(result.source.rstrip("/")).name + "-bomerge")


def _demo(args):
    """The built-in offline demo: a tiny GPT-NeoX trained here on Python's standard library, its
    checkpoints merged by the full pipeline (GP search, export, card)."""
    from . import api
    from .demo import build_trajectory

    if args.objective != "loss":
        raise BOMergeError("The demo searches on held-out loss; --objective METRIC needs a SOURCE and a "
                           "multiple-choice --dataset.")
    root = build_trajectory(quiet=args.quiet)
    result = api.search(str(root), args.revisions if args.revisions != "last:2" else DEMO_REVISIONS,
                        dataset=str(root / "heldout" / "validation.jsonl"),
                        eval_datasets=[str(root / "heldout" / "ood.jsonl")], trials=args.trials,
                        search=args.search, seed=args.seed, max_eval_tokens=args.max_eval_tokens,
                        batch_size=args.batch_size, cache_dir=args.cache_dir, progress=not args.quiet,
                        storage=args.storage, study_name=args.study_name, dtype=args.dtype)
    return _save(result, args, default_name="pythia-tiny-demo-bomerge")


def _save(result, args, default_name: str, claim: bool = True):
    """Write (and push) the merge. For a search, the study's storage decides which worker does it: exactly
    one, the first to finish once the budget is spent; the others report where it went."""
    from . import parallel, workers
    from .study import open_storage, safe_url

    if not parallel.is_main():  # under `accelerate launch`, only the main process writes
        return None
    output = Path(args.output or default_name).expanduser().resolve()
    storage = open_storage(result.storage) if claim and result.storage else None
    owned = storage is not None
    if storage is not None:
        winner = workers.claim_export(storage, result.study, result.budget,
                                      {"output": str(output), "push_to_hub": args.push_to_hub})
        if winner is not None and _write_again(storage, result, winner, output):
            owned = False  # a lone re-run of a finished study whose output is gone: write it, keep the claim
        elif winner is not None:
            result.output = winner.get("output")
            print(f"hf-bomerge: the budget of {result.budget} trials of study {result.study} is spent and its merge "
                  f"is exported by {winner.get('worker')} (to {winner.get('output')}, since {winner.get('at')}"
                  f"{'' if winner.get('done') else ', maybe still running'}); this run writes nothing. To write it "
                  f"again: hf-bomerge export --storage {safe_url(result.storage)} --study-name {result.study} --output DIR",
                  file=sys.stderr)
            return result
    try:
        with workers.claim_heartbeat(storage, result.study, result.budget) if owned else contextlib.nullcontext():
            result.save_pretrained(output, overwrite=args.overwrite, max_shard_size=args.max_shard_size,
                                   progress=not args.quiet)
            if args.push_to_hub:
                url = result.push_to_hub(args.push_to_hub, token=args.token, private=args.private or None,
                                         revision=args.hub_revision, commit_message=args.commit_message)
                print(f"pushed to {url}", file=sys.stderr)
    except BaseException:  # the export failed (or was interrupted): a re-run may claim it again
        if owned:
            workers.release_export(storage, result.study, result.budget)
        raise
    if owned:
        workers.finish_export(storage, result.study, result.budget)
    return result


def _write_again(storage, result, winner: dict, output: Path) -> bool:
    """A finished study run again alone (this process ran none of its trials) whose output folder is gone."""
    import optuna

    from . import workers

    if not winner.get("done") or output.exists():
        return False
    return not workers.ran_trials_here(optuna.load_study(study_name=result.study, storage=storage))


def _show(args) -> None:
    """A study's trials, or the studies of a storage."""
    from .study import show_study

    report = show_study(args.storage, args.study_name, args.cache_dir)
    print(json.dumps(report) if args.json else format_study(report))
    return None


def format_study(report: dict) -> str:
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


def _dry_run(args):
    """Resolve the revisions, estimate downloads, memory and disk, and stop (nothing is downloaded)."""
    from . import api

    fixed = bool(args.weights or args.method)
    plan = api.plan(args.source, args.revisions, max_checkpoints=args.max_checkpoints, token=args.token,
                    cache_dir=args.cache_dir, device=args.device, eval_dtype=args.eval_dtype,
                    batch_size=args.batch_size, block_size=args.block_size, max_memory=args.max_memory,
                    evaluate=not (fixed and args.no_eval), device_map=args.device_map)
    names, pins, note = plan.revisions, plan.shas, plan.note
    fits = True
    try:
        plan.check()
    except BOMergeError as err:
        fits, reason = False, str(err)
    if args.json:
        print(json.dumps({**plan.as_dict(), "fits": fits}))
    else:
        print("\n".join([f"would merge {len(names)} revisions of {plan.source}:"] +
                         [f"  {n}  {s}" for n, s in zip(names, pins)] + ([note] if note else []) +
                         [plan.describe()] + ([] if fits else [f"does NOT fit: {reason}"])))
    return None


def report(result, args) -> None:
    """The human summary (stderr under --json) and the JSON object on stdout's last line."""
    out = sys.stderr if args.json else sys.stdout
    print(format_summary(result), file=out)
    if args.json:
        print(json.dumps(result.summary()), flush=True)


def format_summary(result) -> str:
    lines = [f"merged {len(result.revisions)} revisions of {result.source} -> {result.output}", "", "weights:"]
    lines += [f"  {name:<24} {w:9.5f}" for name, w in zip(result.revisions, result.weights)]
    if result.loss is not None:
        lines += ["", *_scores(result)]
        objective, sign = result.objective, 1 if direction(result.objective) == "minimize" else -1
        unit = " nats/token" if objective == "loss" else ""
        singles = {k: v for k, v in result.baselines.items() if k in result.revisions}
        if singles:
            best = best_of(singles, key=singles.get, objective=objective)
            delta = sign * (result.loss - singles[best])
            verdict = "better than" if delta < 0 else "NOT better than"
            lines += ["", f"the merge is {verdict} the best single checkpoint ({best}) by {abs(delta):.5f}{unit}"]
            if "uniform" in result.baselines:
                du = sign * (result.loss - result.baselines["uniform"])
                lines += [f"and {'better' if du < 0 else 'not better'} than the uniform average by {abs(du):.5f}"]
    for name, row in result.generalization.items():
        lines += ["", f"generalization (loss) on {name}: merged {row['merged']:.5f}, best single "
                  f"({row['best_single_revision']}) {row['best_single']:.5f}, uniform {row['uniform']:.5f}"]
    return "\n".join(lines)


def _scores(result) -> list[str]:
    """The merge and the baselines on the objective: loss with perplexity, or the metric."""
    if result.objective == "loss":
        return [f"held-out loss on {result.dataset} ({result.eval_tokens} tokens):",
                *(f"  {k:<24} {v:9.5f}  (ppl {perplexity(v):.3f})"
                  for k, v in {"merged": result.loss, **result.baselines}.items())]
    return [f"held-out {result.objective} (higher is better) on {result.dataset} ({result.eval_questions} questions):",
            *(f"  {k:<24} {v:9.5f}" for k, v in {"merged": result.loss, **result.baselines}.items())]

if __name__ == "__main__":
    sys.exit(main())
