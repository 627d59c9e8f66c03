"""`hf-bomerge demo`: the built-in offline demo: a tiny GPT-NeoX trained here on Python's standard library, its
checkpoints merged by the full pipeline (GP search, export, card)."""

from __future__ import annotations

import argparse
import dataclasses

from ..demo import build_trajectory
from ..errors import BOMergeError
from ..objectives import objective_class
from . import options, search
from .output import finish

DEMO_REVISIONS = "last:4"
DESCRIPTION = __doc__.split(": ", 1)[1]
# What benchmarks/reproduce.py measured on this model and data (benchmarks/README.md, "Reproducing the papers").
NOTE = ("Trained for 1200 steps with two seeds (benchmarks/reproduce.py in the hf-bomerge repository), the same "
        "model and data gave this: merging the last 8 constant-learning-rate checkpoints (SMA, EMA, WMA or the GP "
        "search) beat a fork annealed to zero over the last 200 steps by 0.007 to 0.023 nats/token on held-out code "
        "the search never saw, while averaging a window that reached into the first 400 steps was worse there than "
        "its latest checkpoint in 3 of 4 cases.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    search.add_arguments(p, source=False)
    p.set_defaults(revisions=DEMO_REVISIONS, source="demo", recipe=None, dry_run=False)


def run(args: argparse.Namespace) -> int:
    options.from_args(args)  # every value and combination checked before the model is trained
    from .. import api  # heavy (torch): after the options are checked

    if objective_class(args.objective).layout != "loss":
        raise BOMergeError("The demo searches on held-out loss; --objective METRIC needs a SOURCE and a "
                           "multiple-choice --dataset.")
    root = build_trajectory(quiet=args.quiet)
    result = api.search(str(root), args.revisions, dataset=str(root / "heldout" / "validation.jsonl"),
                        eval_datasets=[str(root / "heldout" / "ood.jsonl")], trials=args.trials,
                        search=args.search, seed=args.seed, max_eval_tokens=args.max_eval_tokens,
                        batch_size=args.batch_size, cache_dir=args.cache_dir, progress=not args.quiet,
                        storage=args.storage, study_name=args.study_name, dtype=args.dtype,
                        confirm_fraction=args.confirm_fraction, fallback=args.fallback,
                        layer_groups=args.layer_groups)
    return finish(dataclasses.replace(result, note=NOTE), args, default_name="pythia-tiny-demo-bomerge")
