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
# The card's source: the run this merge is of, by what it is (its cache folder is only a hash of the build).
SOURCE_NAME = ("the hf-bomerge demo run: a 231k-parameter GPT-NeoX trained by `hf-bomerge demo` on this machine "
               "on CPython's standard library, 600 steps at a constant learning rate")
# What benchmarks/reproduce.py measured on ANOTHER run (benchmarks/README.md, "Reproducing the papers"): labelled so
# that no reader takes it for this merge's numbers, which are the card's tables.
NOTE = ("Not this run's numbers: a separate benchmark (benchmarks/reproduce.py in the hf-bomerge repository) trained "
        "the same architecture on the same data for 1200 steps with two seeds, and there merging the last 8 "
        "constant-learning-rate checkpoints (SMA, EMA, WMA or the GP search) beat a fork annealed to zero over the "
        "last 200 steps by 0.007 to 0.023 nats/token on held-out code the search never saw, while averaging a window "
        "that reached into the first 400 steps was worse there than its latest checkpoint in 3 of 4 cases. This "
        "merge's own numbers are in the tables below.")


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
    return finish(dataclasses.replace(result, note=NOTE, source_name=SOURCE_NAME), args,
                  default_name="pythia-tiny-demo-bomerge")
