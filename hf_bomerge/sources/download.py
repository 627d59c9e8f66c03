"""`hf-bomerge download`: fetch on a connected machine exactly what a later offline run needs.

That is, for each chosen revision its config, tokenizer and weight files (never optimizer states), the
branch names in the cache's `refs/` (so that the offline run resolves them as huggingface_hub does), the
source's model card (its license goes into the merge's card), a `--tokenizer` repo's tokenizer files, and
the held-out datasets. Then it prints the command to run with `HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1`.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..cli.options import DEFAULTS
from ..errors import HubError
from ..objectives.heldout import HeldOutSpec, load_split
from ..prepare import _bar, quiet_libraries, resolve, tokenizer_folder, tokenizer_source
from ..specs import EvalSpec
from . import offline

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
             cache_dir: str | Path | None = None, progress: bool = True, config: str | None = None,
             key_map: str | None = None) -> Downloaded:
    """Fetch the revisions (pinned), their tokenizer and the held-out datasets into the caches.

    >>> done = download("EleutherAI/pythia-160m", "last:4", dataset="Salesforce/wikitext")   # doctest: +SKIP
    >>> print(done.command)                                                                   # doctest: +SKIP
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 hf-bomerge EleutherAI/pythia-160m --revisions step140000,…
    """
    if offline.is_offline():
        raise HubError("hf-bomerge download fetches from the Hub, but HF_HUB_OFFLINE=1 is set: run it on a machine "
                       "with a connection, without HF_HUB_OFFLINE.")
    if not progress:
        quiet_libraries()
    src, names, pins, note, _ = resolve(source, revisions, max_checkpoints, token, cache_dir,  # duplicates once
                                        options={"config": config, "key_map": key_map})
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
    args += [a for flag, value in (("--config", config), ("--key-map", key_map)) if value for a in (flag, value)]
    if cache_dir:
        args += ["--cache-dir", str(cache_dir)]
    return Downloaded(src.id, list(names), list(pins), fetched, tokenizer, f"{OFFLINE_ENV} {shlex.join(args)}")
