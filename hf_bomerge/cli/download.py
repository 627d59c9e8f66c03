"""`hf-bomerge download`: its options and its run (fetch what a later offline run needs)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import main as cli_main
from . import options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="Hub repo id ORG/NAME (or a local folder / git repository)")
    options.add(p, "revisions", "max_checkpoints", "dataset", "dataset_config", "split", "eval_datasets")
    p.add_argument("--no-eval", action="store_true", help="the later run is a fixed merge with --no-eval: no dataset")
    options.add(p, "tokenizer", "config", "key_map")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the login cache); never printed")
    p.add_argument("--cache-dir", help="the cache the offline run will use (default: the HF cache)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="tracebacks for every error")


def run(args: argparse.Namespace) -> int:
    """Download, then print the offline command on stdout (what was fetched on stderr)."""
    options.check_download(args)  # before anything is fetched or imported
    from ..sources.download import download  # the Hub client and torch: after the checks, never for --help
    done = download(args.source, args.revisions, max_checkpoints=args.max_checkpoints, dataset=args.dataset,
                    dataset_config=args.dataset_config, split=args.split, eval_datasets=args.eval_dataset,
                    evaluate=not args.no_eval, tokenizer=args.tokenizer, token=args.token,
                    cache_dir=args.cache_dir, progress=not args.quiet, config=args.config, key_map=args.key_map)
    print(f"downloaded {len(done.revisions)} revisions of {done.source} ({', '.join(done.revisions)})"
          + (f" and the datasets {', '.join(done.datasets)}" if done.datasets else "")
          + ". Run offline (same HF_HOME / --cache-dir) with:", file=sys.stderr)
    print(done.command)
    return 0


def main(argv: Sequence[str]) -> int:
    """`hf-bomerge download ...` through the command line's registry."""
    return cli_main(["download", *argv])
