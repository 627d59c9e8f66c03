"""`hf-bomerge watch`: its options (the watch's own, then every search option a round takes) and its run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..defaults import DEFAULT_MAX_SHARD_SIZE
from ..searching.watch import TRIALS  # a light module: the pipeline is imported when a round runs
from . import main as cli_main
from . import options
from .search import add_data_options, add_device_options, add_search_options


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `hf-bomerge watch`: the watch's own, then every option of a search that a round takes
    (`options.WATCH`: all but the revisions, which the watch picks, and the fixed merges')."""
    p.add_argument("source", help="Hub repo id ORG/NAME (its branches) or a training output folder (checkpoint-N)")
    p.add_argument("--output", required=True, help="folder of the rounds: <latest>/, watch.jsonl, watch.png")
    p.add_argument("--window", type=int, default=4, help="merge the last K revisions (default 4)")
    p.add_argument("--poll", type=float, default=60.0, help="seconds between looks for new revisions (default 60)")
    p.add_argument("--stop-after", type=int, metavar="M", help="exit after M rounds")
    p.add_argument("--latest", metavar="REV", help="do one round, for the window ending at REV, and exit")
    p.add_argument("--settle", type=float, default=2.0,
                   help="a local folder must be unchanged this many seconds before it is read (default 2)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="push each round to the branch <latest>-bomerge")
    p.add_argument("--private", action="store_true", help="create the Hub repo private")
    p.add_argument("--save-dcp", action="store_true", help="also write each round's merge as a distributed "
                   "checkpoint in the run's own names (<latest>/dcp/, model state only; DCP sources)")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the login cache); never printed")
    add_data_options(p.add_argument_group("held-out data (as for a run)"))
    g = p.add_argument_group("search (as for a run; each round is one study)")
    add_search_options(g, trials=dict(default=TRIALS, help="COMPLETE trials per round, seeds included"))
    options.add(g, "ema_alpha", "tokenizer", "on_duplicate", "config", "key_map")
    g = p.add_argument_group("other")
    options.add(g, "dtype")
    g.add_argument("--max-shard-size", help=f"largest weight file written (default: {DEFAULT_MAX_SHARD_SIZE})")
    add_device_options(g)
    g.add_argument("--cache-dir", help="downloads, tokenized held-out data and the default study storage")
    g.add_argument("--json", action="store_true", help="print each round's JSON object on its own stdout line")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--debug", action="store_true", help="tracebacks for every error")
    return p


def run(args: argparse.Namespace) -> int:
    """`hf-bomerge watch` with parsed `args`; returns the exit status."""
    from ..searching.watch import LEDGER, read_ledger, watch, watch_once  # the pipeline: not for --help

    options.from_args(args, options.WATCH)  # every value and combination checked before anything is read or loaded
    common = dict(window=args.window, trials=args.trials, push_to_hub=args.push_to_hub, token=args.token,
                  private=args.private or None, settle=args.settle, max_shard_size=args.max_shard_size,
                  quiet=args.quiet, storage=args.storage, cache_dir=args.cache_dir, save_dcp=args.save_dcp,
                  **{options.OPTIONS[k].keyword: getattr(args, options.OPTIONS[k].dest)
                     for k in options.WATCH if k != "trials"})

    def emit(record: dict) -> None:
        if args.json:
            print(json.dumps(record), flush=True)

    try:
        if args.latest:
            emit(watch_once(args.source, args.output, latest=args.latest, poll=min(args.poll, 2.0), **common))
        else:
            watch(args.source, args.output, poll=args.poll, stop_after=args.stop_after, on_round=emit, **common)
    except KeyboardInterrupt:
        rounds = read_ledger(args.output)
        where = f"after {rounds[-1]['latest']}" if rounds else "from the start"
        print(f"hf-bomerge watch: stopped. {len(rounds)} finished rounds are in {Path(args.output) / LEDGER}; "
              f"run the same command again to resume {where}.", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    """`hf-bomerge watch ...` (also `python -m hf_bomerge.cli.watch ...`)."""
    return cli_main(["watch", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
