"""Before any work: resolve the revisions, plan memory and disk, download, and validate the checkpoints."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .checkpoints import CheckpointSet, check_same_tokenizer
from .engine import DTYPES
from .writer import parse_size
from .errors import CorruptFileError, HubError
from .hub import Source, default_cache_dir, open_source, weight_sizes
from .plan import Plan, make_plan
from .revisions import resolve_revisions

logger = logging.getLogger("hf_bomerge")


@dataclass
class Prepared:
    source: Source
    names: list[str]
    shas: list[str]
    folders: list[Path]
    tokenizer_folder: Path
    note: str | None
    ckpts: CheckpointSet
    mode: str = "resident"  # the plan's: the checkpoints resident beside the model, or streamed per trial


def resolve(source: str, revisions: str, max_checkpoints: int, token, cache_dir,
             shas: Sequence[str] | None = None):
    """The source, the chosen revision names (oldest first), their pins, and the thinning note."""
    src = open_source(source, token=token, cache_dir=cache_dir)
    resolved = resolve_revisions(revisions, src.refs(), max_checkpoints)
    pins = [r.sha for r in resolved.revisions]
    if shas is not None:
        if src.kind == "folder" and list(shas) != pins:
            changed = [n for n, a, b in zip(resolved.names, shas, pins) if a != b]
            raise HubError(f"The checkpoint folders {changed} of {src.id} changed since the recipe was written; "
                           "the recipe cannot be reproduced from them.")
        pins = list(shas)
    return src, resolved.names, pins, resolved.note


def run_plan(src: Source, names: Sequence[str], pins: Sequence[str], *, device: str | None = None,
          eval_dtype: str | None = None, batch_size: int = 4, block_size: int | None = None, evaluate: bool = True,
          cache_dir=None, max_memory: str | int | None = None, device_map: str | None = None) -> Plan:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    budget = parse_size(max_memory) if max_memory else None
    if device_map and torch.cuda.is_available():  # the model and the checkpoints spread over every GPU
        device, budget = "cuda:*", budget and budget * torch.cuda.device_count()
    itemsize = DTYPES[eval_dtype].itemsize if eval_dtype else (4 if device == "cpu" else 2)
    listings = [src.listing(n, p) for n, p in zip(names, pins)]
    local = [src.is_local(n, p, listing) for n, p, listing in zip(names, pins, listings)]
    return make_plan([weight_sizes(listing) for listing in listings], local,
                     src.config(names[-1], pins[-1]), names, device=device, eval_itemsize=itemsize,
                     batch_size=batch_size, block_size=block_size, evaluate=evaluate,
                     paths=[Path(cache_dir or default_cache_dir())], max_memory=budget)


def prepare(source: str, revisions: str, max_checkpoints: int, token, cache_dir, progress: bool,
             shas: Sequence[str] | None = None, planning: dict | None = None) -> Prepared:
    """Resolve the revisions (or take the pinned `shas` of a recipe), check the plan fits, download them."""
    if not progress:
        quiet_libraries()
    src, names, pins, note = resolve(source, revisions, max_checkpoints, token, cache_dir, shas)
    mode = "resident"
    if planning is not None:
        plan = run_plan(src, names, pins, cache_dir=cache_dir, **planning)
        plan.check()
        mode = plan.mode if plan.evaluate else "resident"
        if mode == "streamed":
            logger.warning("The %d checkpoints do not fit in memory beside the model (%s): streamed mode, every "
                           "trial re-reads them (slower). --max-checkpoints %d would keep them resident.",
                           len(names), plan.device, plan.fitting_checkpoints())
    revs = list(zip(names, pins))
    folders = [src.fetch(name, pin) for name, pin in _bar(revs, "download", progress)]
    try:
        ckpts = CheckpointSet(folders, names)
    except CorruptFileError as err:
        if src.kind != "hub":
            raise
        logger.warning("%s Downloading the revisions again, once.", err)
        folders = [src.fetch(name, pin, force=True) for name, pin in revs]
        ckpts = CheckpointSet(folders, names)
    check_same_tokenizer(folders, names)
    return Prepared(src, names, pins, folders, tokenizer_folder(src, folders[-1]), note, ckpts, mode)


def tokenizer_folder(src: Source, latest: Path) -> Path:
    """The tokenizer of the latest revision, else of `main` / the folder root."""
    if any((latest / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return latest
    if src.kind == "folder" and (src.path / "tokenizer_config.json").is_file():
        return src.path
    refs = src.refs()
    if "main" in refs:
        return src.fetch("main", refs["main"])
    raise HubError(f"No tokenizer in the latest revision of {src.id} nor in its main branch.")


def quiet_libraries() -> None:
    """No progress bars from huggingface_hub, transformers and datasets, without importing the last two (1-2 s
    each): transformers reads huggingface_hub's switch when it is imported, datasets its environment variable."""
    import os
    import sys

    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    else:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def _bar(items, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="rev", disable=not enabled)
