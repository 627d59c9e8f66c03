"""`hf-bomerge download`: fetch on a connected machine exactly what a later offline run needs.

That is, for each chosen revision its config, tokenizer and weight files (never optimizer states), the
branch names in the cache's `refs/` (so that the offline run resolves them as huggingface_hub does), the
source's model card (its license goes into the merge's card), a `--tokenizer` repo's tokenizer files, and
the held-out datasets. Then it prints the command to run with `HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from . import offline, options
from .errors import HubError
from .options import DEFAULTS
from .specs import EvalSpec

OFFLINE_ENV = "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1"


@dataclass
class Downloaded:
    """What `download` fetched, and the offline command that uses it."""

    source: str
    revisions: list[str]
    shas: list[str]
    datasets: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    command: str = ""


def download(source: str, revisions: str = DEFAULTS["revisions"], *,
             max_checkpoints: int = DEFAULTS["max_checkpoints"], dataset: str | None = None,
             dataset_config: str | None = None, split: str | None = None, eval_datasets: Sequence[str] = (),
             evaluate: bool = True, tokenizer: str | None = None, token: str | bool | None = None,
             cache_dir: str | Path | None = None, progress: bool = True) -> Downloaded:
    """Fetch the revisions (pinned), their tokenizer and the held-out datasets into the caches.

    >>> done = download("EleutherAI/pythia-160m", "last:4", dataset="Salesforce/wikitext")   # doctest: +SKIP
    >>> print(done.command)                                                                   # doctest: +SKIP
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 hf-bomerge EleutherAI/pythia-160m --revisions step140000,…
    """
    from .heldout import HeldOutSpec, load_split
    from .prepare import _bar, quiet_libraries, resolve, tokenizer_folder, tokenizer_source

    if offline.is_offline():
        raise HubError("hf-bomerge download fetches from the Hub, but HF_HUB_OFFLINE=1 is set: run it on a machine "
                       "with a connection, without HF_HUB_OFFLINE.")
    if not progress:
        quiet_libraries()
    src, names, pins, note = resolve(source, revisions, max_checkpoints, token, cache_dir)
    if note:
        print(note, file=sys.stderr)
    folders = [src.fetch(name, pin) for name, pin in _bar(list(zip(names, pins)), "download", progress)]
    src.remember_for_offline()  # e.g. a Hub repo's main branch and its card (the license)
    if tokenizer:
        tokenizer_source(tokenizer, token, cache_dir)
    else:
        tokenizer_folder(src, folders[-1])
    specs = []
    if evaluate:
        specs = [EvalSpec.from_options(dataset, dataset_config, split).data, *map(HeldOutSpec.parse, eval_datasets)]
    fetched = []
    for spec in specs:
        if not Path(spec.dataset).expanduser().exists():
            load_split(spec, token)
            fetched.append(spec.label)
    args = ["hf-bomerge", src.id, "--revisions", ",".join(names)]
    if len(names) > 8:
        args += ["--max-checkpoints", "0"]
    args += offline.dataset_args(specs, evaluate) + (["--tokenizer", tokenizer] if tokenizer else [])
    if cache_dir:
        args += ["--cache-dir", str(cache_dir)]
    return Downloaded(src.id, list(names), list(pins), fetched, tokenizer, f"{OFFLINE_ENV} {shlex.join(args)}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="Hub repo id ORG/NAME (or a local folder / git repository)")
    options.add(p, "revisions", "max_checkpoints", "dataset", "dataset_config", "split", "eval_datasets")
    p.add_argument("--no-eval", action="store_true", help="the later run is a fixed merge with --no-eval: no dataset")
    options.add(p, "tokenizer")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the login cache); never printed")
    p.add_argument("--cache-dir", help="the cache the offline run will use (default: the HF cache)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="tracebacks for every error")


def run(args: argparse.Namespace) -> int:
    """Download, then print the offline command on stdout (what was fetched on stderr)."""
    options.check_download(args)  # before anything is fetched
    done = download(args.source, args.revisions, max_checkpoints=args.max_checkpoints, dataset=args.dataset,
                    dataset_config=args.dataset_config, split=args.split, eval_datasets=args.eval_dataset,
                    evaluate=not args.no_eval, tokenizer=args.tokenizer, token=args.token,
                    cache_dir=args.cache_dir, progress=not args.quiet)
    print(f"downloaded {len(done.revisions)} revisions of {done.source} ({', '.join(done.revisions)})"
          + (f" and the datasets {', '.join(done.datasets)}" if done.datasets else "")
          + ". Run offline (same HF_HOME / --cache-dir) with:", file=sys.stderr)
    print(done.command)
    return 0


def main(argv: Sequence[str]) -> int:
    """`hf-bomerge download ...` through the command line's registry."""
    from .cli import main as cli_main

    return cli_main(["download", *argv])
