"""Writing and publishing a `MergeResult`: the merged weights, config, tokenizer, card, plot, recipe."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import OutputError
from ..merging.engine import DTYPES, dtype_name
from ..merging.writer import DEFAULT_MAX_SHARD_SIZE, export_merge, output_infos, replace_dir
from ..plan import free_space, human
from ..reading.checkpoints import CheckpointSet
from ..sources import SIDE_FILES
from .card import render_card
from .dcpsave import DCP_FOLDER, check_dcp_source, write_dcp
from .mergekit import CONFIG_FILE as MERGEKIT_FILE
from .mergekit import mergekit_config
from .plot import LAYER_PLOT_FILE, PLOT_FILE, plot_layer_weights, plot_search
from .push import push_folder

if TYPE_CHECKING:  # a result writes itself through this module (`MergeResult.save_pretrained`)
    from ..result import MergeResult

RECIPE_FILE = "bomerge_recipe.yaml"
RESULT_FILE = "bomerge_result.json"


@dataclass
class Exported:
    """What `export_once` did: `output` holds the merge; `writer` is the claim of the worker that wrote it when
    that was not this call; `url` is the commit pushed."""

    output: str | None
    writer: dict | None = None
    url: str | None = None


def export_once(result: MergeResult, output: str | Path, *, repo_id: str | None = None, token: str | None = None,
                private: bool | None = None, revision: str | None = None, commit_message: str | None = None,
                claim: bool = True, **save_options) -> Exported:
    """Write (and with `repo_id`, push) a search's merge exactly once per study budget, however many workers
    finish it.

    The study's storage decides: the first worker to claim the spent budget writes (its claim keeps a
    heartbeat, so a killed exporter's claim expires and a later run takes it over); the others write nothing
    and get the writer's claim back. A lone re-run of a finished study whose output is gone writes it again.
    A result without a study (a fixed merge, a recipe), or `claim=False` (`hf-bomerge export`: write it again
    on purpose), is simply written.

    >>> export_once(search("EleutherAI/pythia-160m", "last:4", storage=url), "merged").output   # doctest: +SKIP
    """
    target = Path(output).expanduser().resolve()
    storage = workers = None
    study, budget = result.study, result.workspace.budget
    if claim and result.workspace.storage and study:  # a search's study (a fixed merge never imports Optuna)
        from ..searching import workers  # optuna: a fixed merge never imports it
        from ..searching.study import open_storage  # optuna: a fixed merge never imports it

        storage = open_storage(result.workspace.storage)
    owned = storage is not None
    if storage is not None:
        writer = workers.claim_export(storage, study, budget, {"output": str(target), "push_to_hub": repo_id})
        if writer is not None and _write_again(storage, result, writer, target):
            owned = False  # a lone re-run of a finished study whose output is gone: write it, keep the claim
        elif writer is not None:
            return Exported(writer.get("output"), writer)
    done = Exported(str(target))
    try:
        with workers.claim_heartbeat(storage, study, budget) if owned else contextlib.nullcontext():
            folder = save_pretrained(result, target, **save_options)
            if repo_id:
                done.url = push_to_hub(result, repo_id, token=token, private=private, revision=revision,
                                       commit_message=commit_message, folder=folder)
    except BaseException:  # the export failed (or was interrupted): a re-run may claim it again
        if owned:
            workers.release_export(storage, study, budget)
        raise
    if owned:
        workers.finish_export(storage, study, budget)
    return done


def _write_again(storage, result: MergeResult, winner: dict, output: Path) -> bool:
    """A finished study run again alone (this process ran none of its trials) whose output folder is gone."""
    import optuna

    from ..searching import workers  # optuna: a fixed merge never imports it

    if not winner.get("done") or output.exists():
        return False
    return not workers.ran_trials_here(optuna.load_study(study_name=result.study, storage=storage))


def save_pretrained(result: MergeResult, output: str | Path, *, overwrite: bool = False, dtype: str | None = None,
                    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, progress: bool = True,
                    save_dcp: bool = False) -> Path:
    """Write the merged model (sharded safetensors, config, tokenizer, card, recipe, mergekit config) to `output`.

    Everything is written to a temporary sibling folder that is renamed when complete, so `output` never
    holds half a model. An existing folder is replaced only with `overwrite=True` or when it holds an
    earlier result of the same study. Each merged tensor keeps its checkpoints' dtype unless `dtype` (or the
    result's `dtype`) names one. `save_dcp`: also the merge as a distributed checkpoint in the run's names, in
    `dcp/` (a DCP source only; `publish.dcpsave`).

    >>> result.save_pretrained("pythia-160m-bomerge")   # doctest: +SKIP
    """
    import yaml

    target = Path(output).expanduser().resolve()
    _check_output(target, result, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    inputs = result.workspace
    if save_dcp:
        check_dcp_source(inputs.folders[-1])
    ckpts = CheckpointSet(inputs.folders, result.revisions, copied=result.copied or None)
    ckpts.check_unchanged(since=inputs.stamps)  # the files the numbers came from, not a rewrite of them
    result = dataclasses.replace(result, dtype=dtype or result.dtype, output=str(target))  # what the folder holds
    _check_free_space(target, ckpts, result.dtype)
    staging = Path(tempfile.mkdtemp(prefix=_partial_prefix(target), suffix=".partial", dir=target.parent))
    try:
        from tqdm.auto import tqdm

        total = sum(i.nbytes for i in ckpts.infos.values())
        with tqdm(total=total, desc="export", unit="B", unit_scale=True, disable=not progress) as bar:
            export_merge(ckpts, result.merge_weights(), staging, dtype=DTYPES[result.dtype] if result.dtype else None,
                         max_shard_size=max_shard_size, progress=bar)
        _copy_side_files(inputs.folders[-1], inputs.tokenizer_folder, staging, result.dtype)
        if save_dcp:
            write_dcp(staging, inputs.folders[-1], staging / DCP_FOLDER)
        (staging / RECIPE_FILE).write_text(yaml.safe_dump(result.recipe().as_dict(), sort_keys=False))
        (staging / RESULT_FILE).write_text(json.dumps(result.summary(), indent=2) + "\n")
        (staging / MERGEKIT_FILE).write_text(mergekit_config(result, ckpts))
        if result.trace:
            plot_search(result.trace, result.revisions, result.weights, staging / PLOT_FILE, result.objective)
        if result.layer_weights:
            plot_layer_weights(result.layer_weights, result.revisions, staging / LAYER_PLOT_FILE)
        render_card(result, license=result.license, plot=PLOT_FILE if result.trace else None,
                    layer_plot=LAYER_PLOT_FILE if result.layer_weights else None).save(staging / "README.md")
        ckpts.check_unchanged()
        replace_dir(staging, target)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise OutputError(f"The disk holding {target.parent} filled up while the merge was written there; "
                              f"nothing was kept ({staging.name} removed). Free some space or choose an --output "
                              "on a disk with room, then run the same command again.") from err
        raise
    return target


def _partial_prefix(target: Path) -> str:
    """The staging folder's name says whose it is (host and pid), so a later run can tell a dead run's."""
    return f".{target.name}.{socket.gethostname()}-{os.getpid()}-"


def remove_stale_partials(target: Path) -> None:
    """Remove the `.partial` staging siblings of `target` left by runs on this host that are no longer alive (a
    killed export). A staging folder of a live process, or of another host sharing the disk, is left alone."""
    host = socket.gethostname()
    for sibling in target.parent.glob(f".{glob.escape(target.name)}.*.partial"):
        owner = sibling.name[len(target.name) + 2:].rsplit("-", 1)[0]  # "host-pid"
        who, _, pid = owner.rpartition("-")
        if who == host and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(sibling, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_free_space(target: Path, ckpts: CheckpointSet, dtype: str | None) -> None:
    """Refuse before writing when the output's own file system has no room for the merged weights."""
    needed = sum(i.nbytes for i in output_infos(ckpts, DTYPES[dtype] if dtype else None))
    free = free_space(target.parent)
    if needed > free:
        raise OutputError(f"The merged model needs {human(needed)} but the disk holding {target.parent} has "
                          f"{human(free)} free. Free some space or choose an --output on a disk with room.")


def push_to_hub(result: MergeResult, repo_id: str, *, token: str | None = None, private: bool | None = None,
                revision: str | None = None, commit_message: str | None = None,
                folder: str | Path | None = None) -> str:
    """Publish the merged model in `folder` (default: `result.output`; saved to a temporary folder first if
    neither is written) in one commit; returns the commit URL.

    The card is rendered for `repo_id`. Re-pushing an unchanged folder creates no commit.

    >>> result.push_to_hub("me/pythia-160m-bomerge", private=True)   # doctest: +SKIP
    """
    folder = folder or result.output
    if folder is None or not Path(folder).is_dir():
        folder = save_pretrained(result, Path(tempfile.mkdtemp(prefix="bomerge-push-")) / repo_id.split("/")[-1])
    folder = Path(folder)
    result = dataclasses.replace(result, output=str(folder))
    plot = PLOT_FILE if (folder / PLOT_FILE).is_file() else None
    layer_plot = LAYER_PLOT_FILE if (folder / LAYER_PLOT_FILE).is_file() else None
    render_card(result, repo_id=repo_id, license=result.license, plot=plot, layer_plot=layer_plot).save(folder / "README.md")
    message = commit_message or f"Upload a merge of {len(result.revisions)} checkpoints of {result.source} (hf-bomerge)"
    return push_folder(folder, repo_id, token=token, private=private, revision=revision, commit_message=message)


def _check_output(target: Path, result: MergeResult, overwrite: bool) -> None:
    if not target.exists() or overwrite:
        return
    previous = target / RESULT_FILE
    if previous.is_file():
        old = json.loads(previous.read_text())
        if old.get("study") and old.get("study") == result.study:
            return
    if target.is_dir() and not any(target.iterdir()):
        return
    raise OutputError(f"{target} already exists and was not written by hf-bomerge for this study; "
                      "choose another --output or pass --overwrite to replace it.")


def _copy_side_files(reference: Path, tokenizer_folder: Path | None, staging: Path, dtype: str | None) -> None:
    for folder in dict.fromkeys(f for f in (tokenizer_folder, reference) if f is not None):
        for name in SIDE_FILES:
            if (folder / name).is_file() and not (staging / name).exists():
                shutil.copyfile(folder / name, staging / name)
    for code in sorted(reference.glob("*.py")):  # a remote-code model's own modeling files: it cannot load without
        shutil.copyfile(code, staging / code.name)
    config = staging / "config.json"
    if config.is_file() and dtype:  # without --dtype each tensor keeps its dtype, and so does the config
        data = json.loads(config.read_text())
        for key in ("dtype", "torch_dtype"):
            if key in data or key == "dtype":
                data[key] = dtype_name(DTYPES[dtype])
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
