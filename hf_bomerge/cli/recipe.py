"""`hf-bomerge recipe FILE`: rebuild the merge a bomerge_recipe.yaml describes, pinned to its commits, no search."""

from __future__ import annotations

import argparse
from pathlib import Path

from .output import add_common_options, add_output_options, finish

DESCRIPTION = ("Reproduce a merge exactly from the bomerge_recipe.yaml that hf-bomerge writes next to a merged "
               "model (the same revisions pinned to their commits, the same weights), no search. "
               "`hf-bomerge --recipe FILE` does the same.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", metavar="FILE", help="a bomerge_recipe.yaml")
    add_output_options(p)
    add_common_options(p.add_argument_group("other"))


def run(args: argparse.Namespace) -> int:
    from .. import api  # the pipeline (torch): not for --help

    result = api.from_recipe(args.recipe, token=args.token, cache_dir=args.cache_dir, progress=not args.quiet)
    return finish(result, args, default_name=Path(args.recipe).resolve().parent.name + "-reproduced")
