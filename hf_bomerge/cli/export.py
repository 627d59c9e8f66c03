"""`hf-bomerge export`: write (and push) the best merge of a stored study, e.g. one that several workers ran."""

from __future__ import annotations

import argparse
from pathlib import Path

from .output import add_output_options, finish
from .show import add_study_options

DESCRIPTION = "Write the best merge of an existing study (e.g. one that several workers ran)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_study_options(p)
    add_output_options(p)


def run(args: argparse.Namespace) -> int:
    from .. import api  # the pipeline (torch): not for --help

    result = api.from_study(args.study_name, args.storage, token=args.token, cache_dir=args.cache_dir,
                            progress=not args.quiet)
    return finish(result, args, default_name=Path(result.source.rstrip("/")).name + "-bomerge", claim=False)
