"""`hf-bomerge SOURCE [options]`: search the merge weights (or apply a fixed rule), merge, write (and push)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import BOMergeError
from ..spaces import SEARCHES
from ..specs import EvalSpec, FixedSpec, HeldOutSpec, SearchSpec, SourceSpec
from ..weights import METHODS
from .output import add_common_options, add_output_options, finish

DESCRIPTION = ("Merge intermediate checkpoints of one pretraining run with weights found by Bayesian "
               "optimization on held-out loss (or an `evaluate` metric). SOURCE is a Hub repo id, a folder of "
               "checkpoints or a local git repository (a folder named like a command: ./NAME).")
EPILOG = """examples:
  hf-bomerge EleutherAI/pythia-1b --revisions step100000..step143000
  hf-bomerge EleutherAI/pythia-160m --revisions last:2 --search pairwise --trials 12 --json
  hf-bomerge ./trainer-output --revisions checkpoint-1000.. --method ema
  hf-bomerge ./trainer-output --objective ./metrics/accuracy --dataset questions.jsonl
  hf-bomerge recipe merged/bomerge_recipe.yaml --output again
  hf-bomerge demo
  hf-bomerge show --storage postgresql+psycopg://db-host/bomerge         (a study's trials)
  hf-bomerge export --storage postgresql+psycopg://db-host/bomerge --output merged"""


def add_arguments(p: argparse.ArgumentParser, *, source: bool = True) -> None:
    """The search's options; `source=False` (the demo) leaves out SOURCE, fixed merges, --recipe and --dry-run."""
    if source:
        p.add_argument("source", nargs="?", help="Hub repo id ORG/NAME, a local folder or git repository")
    p.add_argument("--version", action="version", version=f"hf-bomerge {_version()}")
    g = p.add_argument_group("revisions")
    g.add_argument("--revisions", default=SourceSpec.revisions,
                   help="A..B (training order, ends inclusive), R1,R2,..., or last:N (default: %(default)s)")
    g.add_argument("--max-checkpoints", type=int, default=SourceSpec.max_checkpoints, help="keep K evenly spaced (default 8; 0 = all)")
    g = p.add_argument_group("held-out data")
    g.add_argument("--dataset", help="Hub dataset id or local file/folder (default Salesforce/wikitext)")
    g.add_argument("--dataset-config", help="dataset config (default wikitext-2-raw-v1 for the default dataset)")
    g.add_argument("--split", help="split (default validation; a local file is its own single split)")
    g.add_argument("--text-column", default=HeldOutSpec.text_column)
    g.add_argument("--eval-dataset", action="append", default=[], metavar="DATASET[:CONFIG][@SPLIT]",
                   help="extra set for the generalization report (repeatable; or a local file)")
    g.add_argument("--max-eval-tokens", type=int, default=EvalSpec.max_eval_tokens,
                   help="cap on the tokens evaluated: the held-out text for loss; for a metric, the first "
                        "questions whose question+choice sequences (all choices) fit in it (default %(default)s)")
    g.add_argument("--block-size", type=int, help="default: min(model context, 2048)")
    g.add_argument("--batch-size", type=int, default=EvalSpec.batch_size,
                   help="blocks per forward pass (a metric: as many question+choice sequences as fit in "
                        "batch-size x block-size tokens; default %(default)s)")
    g.add_argument("--eval-dtype", choices=["float32", "float16", "bfloat16", "float64"],
                   help="default float32 on CPU, the checkpoint dtype on CUDA")
    g.add_argument("--objective", default=EvalSpec.objective, metavar="loss|METRIC",
                   help="loss (mean token NLL, minimized; default), or an `evaluate` metric name or local path "
                        "(maximized) graded on multiple-choice rows: --dataset with columns question, choices "
                        "(list) and answer (index or text); each choice scored by its log-likelihood")
    g = p.add_argument_group("search")
    g.add_argument("--search", choices=SEARCHES, default=SearchSpec.space)
    g.add_argument("--trials", type=int, default=SearchSpec.trials, help="total COMPLETE trials of the study, seeds included")
    g.add_argument("--lambda-min", type=float, default=SearchSpec.lambda_min,
                   help="pairwise lower bound of λ (default %(default)s)")
    g.add_argument("--layer-groups", type=int, default=SearchSpec.layer_groups, metavar="G",
                   help="depth-wise weights: a weight vector each for the embeddings, G groups of transformer "
                        "blocks and the head, interpolated between a shallow and a deep vector (2·N dimensions; "
                        "N ≤ 8; default 0 = one global vector)")
    g.add_argument("--seed", type=int, default=SearchSpec.seed)
    g.add_argument("--storage", help="Optuna storage URL (default: SQLite under the cache dir)")
    g.add_argument("--study-name", help="default: derived from the inputs")
    g.add_argument("--confirm-fraction", type=float, default=EvalSpec.confirm_fraction,
                   help="held-out blocks kept from the search to confirm the merge on (every 4th: 0.25; 0 = off)")
    g.add_argument("--fallback", action="store_true",
                   help="export the best baseline instead when the merge is not better on the confirm part")
    if source:
        g = p.add_argument_group("fixed merges (no search)")
        g.add_argument("--weights", help="W1,W2,... one per revision, oldest first")
        g.add_argument("--method", choices=METHODS)
        g.add_argument("--ema-alpha", type=float, default=SearchSpec.ema_alpha)
        g.add_argument("--window", type=float, metavar="W",
                       help="wsm-* methods: the decay's window in the revisions' progress unit (tokens when their "
                            "names carry them, e.g. OLMo step1000-tokens4B or train_00220B; else steps, or tokens "
                            "with --tokens-per-step); default: their whole span")
        g.add_argument("--tokens-per-step", type=float, metavar="T",
                       help="tokens per optimizer step: step-named revisions are placed (and --window read) in tokens")
        g.add_argument("--allow-extrapolation", action="store_true", help="allow negative/unnormalized weights")
        g.add_argument("--no-eval", action="store_true", help="fixed merges: skip the held-out evaluation")
        g.add_argument("--recipe", metavar="FILE", help="the same as `hf-bomerge recipe FILE`")
    g.add_argument("--tokenizer", metavar="REPO_OR_PATH", help="tokenizer for the evaluation and the merge, when the "
                   "checkpoints have none (default: the latest revision's, else main's / the folder root's)")
    add_output_options(p, dtype=True)
    g = p.add_argument_group("other")
    g.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument("--device-map", choices=["auto", "balanced", "balanced_low_0", "sequential"],
                   help="spread the model (and each device's share of the checkpoints) over all visible GPUs "
                        "with Accelerate; default: the whole model on --device")
    g.add_argument("--max-memory", help="memory the run may use per device, e.g. 20GB (default: what is free)")
    g.add_argument("--trust-remote-code", action="store_true", help="run the repo's own model code (off by default)")
    if source:
        g.add_argument("--dry-run", action="store_true", help="resolve the revisions and print the plan only")
    add_common_options(g)


def run(args: argparse.Namespace) -> int:
    from .. import api

    if args.recipe:
        from . import recipe

        return recipe.run(args)
    if args.source is None:
        raise BOMergeError("Give a SOURCE (a Hub repo id such as EleutherAI/pythia-160m, or a folder of "
                           "checkpoints), or a command: recipe FILE, demo, show, export. See hf-bomerge --help.")
    if (args.window is not None or args.tokens_per_step is not None) and not (args.method or "").startswith("wsm-"):
        raise BOMergeError("--window and --tokens-per-step shape a schedule-shaped fixed merge: use them with "
                           "--method wsm-linear, wsm-cosine or wsm-sqrt (--search schedule finds the window itself).")
    if args.dry_run:
        return dry_run(args)
    source = SourceSpec(args.source, args.revisions, args.max_checkpoints, None, args.tokenizer, args.dtype,
                        args.trust_remote_code)
    evaluation = EvalSpec.from_options(
        args.dataset, args.dataset_config, args.split, args.text_column, objective=args.objective,
        max_eval_tokens=args.max_eval_tokens, block_size=args.block_size, batch_size=args.batch_size,
        eval_dtype=args.eval_dtype, device=args.device, device_map=args.device_map, max_memory=args.max_memory,
        confirm_fraction=args.confirm_fraction)
    where = dict(token=args.token, cache_dir=args.cache_dir, progress=not args.quiet)
    if args.weights or args.method:
        from ..weights import parse_weights

        fixed = FixedSpec(tuple(parse_weights(args.weights)) if args.weights else None, args.method, args.ema_alpha,
                          args.window, args.tokens_per_step, args.allow_extrapolation)
        result = api.merge_with(source, fixed, None if args.no_eval else evaluation, **where)
    else:
        search = SearchSpec(args.search, args.trials, args.seed, args.lambda_min, args.ema_alpha, args.layer_groups,
                            args.fallback, tuple(args.eval_dataset))
        result = api.search_with(source, evaluation, search, storage=args.storage, study_name=args.study_name,
                                 **where)
    return finish(result, args, default_name=Path(result.source.rstrip("/")).name + "-bomerge")


def dry_run(args: argparse.Namespace) -> int:
    """Resolve the revisions, estimate downloads, memory and disk, and stop (nothing is downloaded)."""
    from .. import api

    fixed = bool(args.weights or args.method)
    plan = api.plan(args.source, args.revisions, max_checkpoints=args.max_checkpoints, token=args.token,
                    cache_dir=args.cache_dir, device=args.device, eval_dtype=args.eval_dtype,
                    batch_size=args.batch_size, block_size=args.block_size, max_memory=args.max_memory,
                    evaluate=not (fixed and args.no_eval), device_map=args.device_map,
                    store_dtype=args.dtype)
    if not fixed:  # a search: calibrate the time of a trial on the device (seconds; nothing downloaded)
        plan.estimate_time(trials=args.trials, max_eval_tokens=args.max_eval_tokens, batch_size=args.batch_size,
                           block_size=args.block_size, eval_dtype=args.eval_dtype,
                           confirm_fraction=args.confirm_fraction)
    elif not args.no_eval:  # a fixed merge scores one weight vector
        plan.estimate_time(trials=1, max_eval_tokens=args.max_eval_tokens, batch_size=args.batch_size,
                           block_size=args.block_size, eval_dtype=args.eval_dtype, confirm_fraction=0.0)
    fits = True
    try:
        plan.check()
    except BOMergeError as err:
        fits, reason = False, str(err)
    if args.json:
        print(json.dumps({**plan.as_dict(), "fits": fits}))
    else:
        print("\n".join([f"would merge {len(plan.revisions)} revisions of {plan.source}:"] +
                        [f"  {n}  {s}" for n, s in zip(plan.revisions, plan.shas)] + ([plan.note] if plan.note else [])
                        + [plan.describe()] + ([] if fits else [f"does NOT fit: {reason}"])))
    return 0


def _version() -> str:
    from .. import __version__

    return __version__
