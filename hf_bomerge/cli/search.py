"""`hf-bomerge SOURCE [options]`: search the merge weights (or apply a fixed rule), merge, write (and push)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import __version__
from ..errors import BOMergeError, OptionError
from . import options, recipe
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
    """The search's options (`hf_bomerge.cli.options`: declared on the specs); `source=False` (the demo) leaves out
    SOURCE, fixed merges, --recipe and --dry-run."""
    if source:
        p.add_argument("source", nargs="?", help="Hub repo id ORG/NAME, a local folder or git repository")
    p.add_argument("--version", action="version", version=f"hf-bomerge {_version()}")
    options.add(p.add_argument_group("revisions"), "revisions", "max_checkpoints", "on_duplicate")
    add_data_options(p.add_argument_group("held-out data"))
    g = p.add_argument_group("search")
    add_search_options(g)
    g.add_argument("--study-name", help="default: derived from the inputs")
    if source:
        g = p.add_argument_group("fixed merges (no search)")
        options.add(g, "weights", "method", "ema_alpha", "window", "tokens_per_step", "allow_extrapolation")
        g.add_argument("--no-eval", action="store_true", help="fixed merges: skip the held-out evaluation")
        g.add_argument("--recipe", metavar="FILE", help="the same as `hf-bomerge recipe FILE`")
    options.add(g, "tokenizer")
    options.add(p.add_argument_group("distributed checkpoints (DCP)"), "config", "key_map")
    add_output_options(p, dtype=True)
    g = p.add_argument_group("other")
    add_device_options(g)
    if source:
        g.add_argument("--dry-run", action="store_true", help="resolve the revisions and print the plan only")
    add_common_options(g)


def add_data_options(g) -> None:
    """The held-out data and the numerics of its forward passes (search, demo, watch)."""
    options.add(g, "dataset", "dataset_config", "split", "text_column", "eval_datasets", "max_eval_tokens",
                "block_size", "batch_size", "eval_dtype", "objective", "lm_eval_tasks", "lm_eval_metric")


def add_search_options(g, **overrides) -> None:
    """The search's own options and its study's storage (search, demo, watch: `overrides` its --trials)."""
    options.add(g, "search", "trials", "lambda_min", "layer_groups", "seed", **overrides)
    g.add_argument("--storage", help="Optuna storage URL (default: SQLite under the cache dir)")
    options.add(g, "confirm_fraction", "fallback")


def add_device_options(g) -> None:
    options.add(g, "device", "device_map", "max_memory", "trust_remote_code")


def run(args: argparse.Namespace) -> int:
    if args.recipe:
        flags = options.given(args)
        clash = (["SOURCE"] if args.source else []) + [f for k, f in flags.items() if k in options.OPTIONS or k in
                                                       ("storage", "study_name", "no_eval", "dry_run")]
        if clash:
            raise OptionError(f"--recipe FILE rebuilds the merge its recipe pins (the same revisions and weights, no "
                              f"search): {', '.join(clash)} would be ignored. Drop {'them' if len(clash) > 1 else 'it'}"
                              ", or drop --recipe.")
        return recipe.run(args)
    if args.source is None:
        raise BOMergeError("Give a SOURCE (a Hub repo id such as EleutherAI/pythia-160m, or a folder of "
                           "checkpoints), or a command: recipe FILE, demo, show, export. See hf-bomerge --help.")
    specs = options.from_args(args)  # every value and combination checked: before torch is imported
    if args.dry_run:
        return dry_run(args, specs)
    from .. import api  # the pipeline (torch): after the options are checked

    where = dict(token=args.token, cache_dir=args.cache_dir, progress=not args.quiet)
    if specs.fixed is not None:
        result = api.merge_with(specs.source, specs.fixed, specs.evaluation, **where)
    else:
        result = api.search_with(specs.source, specs.evaluation, specs.search, storage=args.storage,
                                 study_name=args.study_name, **where)
    return finish(result, args, default_name=Path(result.source.rstrip("/")).name + "-bomerge")


def dry_run(args: argparse.Namespace, specs: options.Run) -> int:
    """Resolve the revisions, estimate downloads, memory and disk, and stop (nothing is downloaded)."""
    from .. import api  # the pipeline (torch): after the options are checked

    fixed = specs.fixed is not None
    plan = api.plan(args.source, args.revisions, max_checkpoints=args.max_checkpoints, token=args.token,
                    cache_dir=args.cache_dir, device=args.device, eval_dtype=args.eval_dtype,
                    batch_size=args.batch_size, block_size=args.block_size, max_memory=args.max_memory,
                    evaluate=not (fixed and args.no_eval), device_map=args.device_map,
                    store_dtype=args.dtype, on_duplicate=args.on_duplicate)
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
    return __version__
