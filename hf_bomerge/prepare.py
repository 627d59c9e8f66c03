"""Before any work: resolve the revisions, plan memory and disk, download, and validate the checkpoints."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .duplicates import Duplicates, dedupe
from .errors import BOMergeError, CorruptFileError, HubError
from .merging.engine import DTYPES
from .merging.writer import parse_size
from .objectives.heldout import load_split
from .plan import Plan, make_plan
from .reading import phase
from .reading.checkpoints import CheckpointSet, check_same_tokenizer
from .reading.verdict import WindowPhase
from .sources import Source, default_cache_dir, offline, open_source, tokenizer_files
from .sources.revisions import resolve_revisions, thin_selection

logger = logging.getLogger("hf_bomerge")


@dataclass
class Prepared:
    source: Source
    names: list[str]
    shas: list[str]
    folders: list[Path]
    tokenizer_folder: Path | None  # None: no tokenizer anywhere (a merge without evaluation is written without)
    note: str | None
    ckpts: CheckpointSet
    mode: str = "resident"  # the plan's: the checkpoints resident beside the model, or streamed per trial
    token: str | bool | None = None  # the user's token (or False/None): the held-out data is loaded with it too
    rescore_mode: str = "resident"  # the plan's for the re-score in the saved dtype
    plan: Plan | None = None
    duplicates: Duplicates = Duplicates()  # revisions left out before the download: they served the same weights
    phase: WindowPhase | None = None  # where in training the window lies, and revisions that jump (`reading.phase`)


def resolve(source: str, revisions: str, max_checkpoints: int, token, cache_dir,
            shas: Sequence[str] | None = None, on_duplicate: str | None = "merge-once",
            options: dict | None = None):
    """The source (opened with `options`: `SourceSpec.config`, `key_map`), the chosen revision names (oldest
    first), their pins, the thinning note and the duplicates.

    Revisions serving identical weights are left out first (`hf_bomerge.duplicates`; `on_duplicate=None` keeps
    them), then a range is thinned to `max_checkpoints`: eight distinct checkpoints, not eight names of which
    some serve the same bytes."""
    src = open_source(source, token=token, cache_dir=cache_dir, **(options or {}))
    if shas is not None:  # pinned: used directly, once the source confirms they still read as recorded
        src.verify_pins(revisions.split(","), list(shas))
        return src, revisions.split(","), list(shas), None, Duplicates()
    resolved = resolve_revisions(revisions, src.refs(), 0)
    names, pins, dups = resolved.names, [r.sha for r in resolved.revisions], Duplicates()
    if on_duplicate is not None:
        names, pins, dups = dedupe(src, names, pins, on_duplicate)
    kept, thinned = thin_selection(revisions, names, max_checkpoints)
    pins = [pins[names.index(n)] for n in kept]
    note = "; ".join(n for n in (resolved.note, thinned) if n) or None
    return src, kept, pins, note, dups


def run_plan(src: Source, names: Sequence[str], pins: Sequence[str], *, device: str | None = None,
          eval_dtype: str | None = None, batch_size: int = 4, block_size: int | None = None, evaluate: bool = True,
          cache_dir=None, max_memory: str | int | None = None, device_map: str | None = None,
          store_dtype: str | None = None) -> Plan:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    devices = None
    if device_map and torch.cuda.is_available():  # the model and the checkpoints spread over every GPU
        device, devices = "cuda:*", [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if eval_dtype:
        itemsize = DTYPES[eval_dtype].itemsize
    else:  # as `evaluator.choose_eval_dtype` (float32 for a GPU without bfloat16 counts the most it may take)
        itemsize = 2 if device != "cpu" and has_bf16() else 4
    sizes = [src.weight_sizes(n, p) for n, p in zip(names, pins)]
    local = [src.is_local(n, p) for n, p in zip(names, pins)]
    params, stored = src.parameter_count(names[-1], pins[-1])  # from the headers, never from the config's dtype
    return make_plan(sizes, local, src.config(names[-1], pins[-1]), names, device=device, eval_itemsize=itemsize,
                     batch_size=batch_size, block_size=block_size, evaluate=evaluate,
                     paths=[Path(cache_dir or default_cache_dir())],
                     max_memory=parse_size(max_memory) if max_memory else None, params=params, stored_bytes=stored,
                     saved_itemsize=DTYPES[store_dtype].itemsize if store_dtype else None, devices=devices)


def has_bf16() -> bool:
    """Whether the GPU computes in bfloat16 itself (GPUs before Ampere only emulate it, slowly)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def prepare(source: str, revisions: str, max_checkpoints: int, token, cache_dir, progress: bool,
             shas: Sequence[str] | None = None, planning: dict | None = None, heldout: Sequence = (),
             tokenizer: str | None = None, on_duplicate: str = "merge-once", options: dict | None = None) -> Prepared:
    """Resolve the revisions (or take the pinned `shas` of a recipe), check the plan fits, download them.

    `heldout`: the `HeldOutSpec`s the run will load (the objective's first), checked up front when offline;
    `tokenizer`: a repo id or folder whose tokenizer is used instead of the checkpoints' own. Revisions serving
    identical weights are merged once (`hf_bomerge.duplicates`; `on_duplicate="error"` refuses them), before
    the plan and the download. A recipe's pinned revisions are merged as recorded. `options`: the source's
    (`SourceSpec.config`, `key_map`).
    """
    if not progress:
        quiet_libraries()
    evaluate = (planning or {}).get("evaluate", True)
    if offline.is_offline():
        check_offline(source, revisions, max_checkpoints, token, cache_dir, shas, heldout if evaluate else (),
                      tokenizer, evaluate)
    src, names, pins, note, dups = resolve(source, revisions, max_checkpoints, token, cache_dir, shas, on_duplicate,
                                           options)
    plan = None
    if planning is not None:
        plan = run_plan(src, names, pins, cache_dir=cache_dir, **planning)
        plan.check()
        if plan.mode == "streamed":
            logger.warning("The %d checkpoints do not fit in memory beside the model (%s): streamed mode, every "
                           "trial re-reads them (slower). --max-checkpoints %d would keep them resident.",
                           len(names), plan.device, plan.fitting_checkpoints())
        elif plan.rescore_mode == "streamed":
            logger.warning("The %d checkpoints do not fit beside the model in the dtype the merge is saved in (%s): "
                           "the reported numbers are scored again in that dtype in streamed mode after the search "
                           "(slower).", len(names), plan.device)
    revs = list(zip(names, pins))
    folders = [src.fetch(name, pin) for name, pin in _bar(revs, "download", progress)]
    try:
        ckpts = CheckpointSet(folders, names)
    except CorruptFileError as err:
        if not src.refetches:
            raise
        logger.warning("%s Downloading the revisions again, once.", err)
        folders = [src.fetch(name, pin, force=True) for name, pin in revs]
        ckpts = CheckpointSet(folders, names)
    check_same_tokenizer(folders, names)
    found = tokenizer_source(tokenizer, token, cache_dir) if tokenizer else tokenizer_folder(src, folders[-1])
    if found is None and evaluate:
        raise HubError(f"{src.id} has no tokenizer (none in the latest revision, its main branch or the folder "
                       "root), and evaluating the merge needs one: pass --tokenizer REPO_OR_PATH (e.g. the base "
                       "model's repo), or merge with --no-eval.")
    if found is None:
        logger.warning("No tokenizer in %s: the merge is written without one (pass --tokenizer REPO_OR_PATH to "
                       "include one).", src.id)
    window = phase.check(ckpts, names, folders)
    return Prepared(src, names, pins, folders, found, note, ckpts, plan.mode if plan else "resident", token,
                    plan.rescore_mode or plan.mode if plan else "resident", plan, dups, window)


def has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def tokenizer_folder(src: Source, latest: Path) -> Path | None:
    """The tokenizer of the latest revision, else the source's fallback (its `main`, the folder root); None if
    there is none."""
    if has_tokenizer(latest):
        return latest
    folder = src.tokenizer_fallback(src.refs())
    return folder if folder is not None and has_tokenizer(folder) else None


def tokenizer_source(spec: str, token, cache_dir) -> Path:
    """`--tokenizer REPO_OR_PATH`: a folder holding a tokenizer, or a Hub repo's (main) tokenizer files."""
    path = Path(spec).expanduser()
    if path.exists():
        if not has_tokenizer(path):
            raise HubError(f"--tokenizer {spec}: the folder holds no tokenizer (tokenizer.json, "
                           "tokenizer_config.json or tokenizer.model).")
        return path
    folder = tokenizer_files(spec, "main", token, cache_dir)
    if folder is None or not has_tokenizer(folder):
        raise HubError(f"--tokenizer {spec}: the repo holds no tokenizer files on its main branch.")
    return folder


def check_offline(source: str, revisions: str, max_checkpoints: int, token, cache_dir, shas, heldout: Sequence,
                  tokenizer: str | None, evaluate: bool) -> None:
    """Offline: raise ONE `OfflineError` naming everything the run needs that the cache lacks (revisions,
    their files, the tokenizer, the held-out datasets) with the command that fetches it all."""
    if Path(source).expanduser().exists() and not heldout:
        return
    problems: list[str] = []
    names: Sequence[str] | str = revisions
    if not Path(source).expanduser().exists():
        try:
            src, names, pins, *_ = resolve(source, revisions, max_checkpoints, token, cache_dir, shas,
                                           on_duplicate=None)  # what is missing, before any content is read
        except offline.OfflineError:
            problems.append(f"the revisions {revisions!r} of {source} (no branch of it is cached)")
        except BOMergeError as err:
            problems.append(f"the revisions {revisions!r} of {source} ({err})")
        else:
            for name, pin in zip(names, pins):
                lacking = src.missing(name, pin)
                if lacking:
                    problems.append(f"{name} ({pin[:12]}) of {source}: {', '.join(lacking)}")
            latest = offline.snapshot(source, pins[-1], cache_dir) if pins else None
            if evaluate and not tokenizer and not problems and tokenizer_folder(src, latest) is None:
                problems.append(f"the tokenizer of {source} (main branch)")
    if tokenizer and not Path(tokenizer).expanduser().exists() and tokenizer_files(tokenizer, "main", token,
                                                                                   cache_dir) is None:
        problems.append(f"the tokenizer {tokenizer}")
    for spec in heldout:
        if not Path(spec.dataset).expanduser().exists():
            try:
                load_split(spec, token)
            except BOMergeError:
                problems.append(f"the dataset {spec.label}")
    if problems:
        args = offline.dataset_args(heldout, evaluate) + (["--tokenizer", tokenizer] if tokenizer else [])
        raise offline.offline_error(problems, offline.download_command(source, names, dataset_args=args,
                                                                       cache_dir=cache_dir))


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
