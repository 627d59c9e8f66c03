"""Runs without a network (`HF_HUB_OFFLINE=1`, as on a cluster's compute nodes): what the HF cache holds.

huggingface_hub resolves a branch name offline from the cache's `refs/` folder and a commit sha from
`snapshots/<sha>/`; this module reads the same folders, so a search, a resumed or extended study, a
fixed merge, `--recipe`, `show` and `export` run from the cache. What is missing is gathered into ONE
`OfflineError` that names every missing piece and the `hf-bomerge download` command that fetches them on a
connected machine.

>>> import os; os.environ.get("HF_HUB_OFFLINE")   # read by huggingface_hub at import   # doctest: +SKIP
'1'
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from pathlib import Path

from ..errors import HubError


class OfflineError(HubError):
    """Offline (HF_HUB_OFFLINE=1), and something a run needs is not in the cache."""


def is_offline() -> bool:
    """Whether huggingface_hub runs offline (it reads HF_HUB_OFFLINE once, at import)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache(cache_dir: str | Path | None = None) -> Path:
    """The HF hub cache a run uses: `--cache-dir`, else huggingface_hub's (HF_HUB_CACHE / HF_HOME)."""
    from huggingface_hub import constants

    return Path(cache_dir or constants.HF_HUB_CACHE).expanduser()


def repo_folder(repo_id: str, cache_dir=None, repo_type: str = "model") -> Path:
    """`<cache>/models--ORG--NAME`, as huggingface_hub lays it out."""
    return hub_cache(cache_dir) / f"{repo_type}s--{repo_id.replace('/', '--')}"


def cached_refs(repo_id: str, cache_dir=None, repo_type: str = "model") -> dict[str, str]:
    """{branch: sha} from the cache's `refs/` folder (pull-request refs left out); {} if none."""
    refs = repo_folder(repo_id, cache_dir, repo_type) / "refs"
    if not refs.is_dir():
        return {}
    out = {}
    for path in sorted(p for p in refs.rglob("*") if p.is_file()):
        name = path.relative_to(refs).as_posix()
        if not name.startswith("pr/"):
            out[name] = path.read_text().strip()
    return out


def record_ref(repo_id: str, name: str, sha: str, cache_dir=None, repo_type: str = "model") -> None:
    """Write `refs/<name>` = sha, as huggingface_hub does when it downloads by branch name, so that an offline
    run can resolve the branch. (A download by sha, as every download here is, writes no ref.)"""
    if name == sha:
        return
    path = repo_folder(repo_id, cache_dir, repo_type) / "refs" / name
    try:
        if path.is_file() and path.read_text().strip() == sha:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(sha)
        tmp.replace(path)
    except OSError:  # a read-only shared cache: offline resolution then needs the refs written elsewhere
        pass


def snapshot(repo_id: str, sha: str, cache_dir=None, repo_type: str = "model") -> Path:
    return repo_folder(repo_id, cache_dir, repo_type) / "snapshots" / sha


def cached_listing(repo_id: str, sha: str, cache_dir=None) -> dict[str, int]:
    """{file: bytes} of the files of commit `sha` in the cache (top folder; broken links left out)."""
    folder = snapshot(repo_id, sha, cache_dir)
    if not folder.is_dir():
        return {}
    return {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}


def download_command(source: str, names: Sequence[str] | str, *, dataset_args: Sequence[str] = (),
                     cache_dir=None) -> str:
    """The `hf-bomerge download …` command that fetches what a run needs, for a connected machine."""
    revisions = names if isinstance(names, str) else ",".join(names)
    args = ["hf-bomerge", "download", source, "--revisions", revisions, *dataset_args]
    if cache_dir:
        args += ["--cache-dir", str(cache_dir)]
    return shlex.join(args)


def offline_error(problems: Sequence[str], command: str) -> OfflineError:
    lines = "; ".join(problems)
    return OfflineError(
        f"Offline (HF_HUB_OFFLINE=1) and not in the cache: {lines}. On a machine with a connection, fetch them "
        f"into the same cache (the same HF_HOME / --cache-dir) with: {command}  -- then run this command again "
        "here.")


def dataset_args(specs: Sequence, evaluate: bool = True) -> list[str]:
    """The `--dataset … --eval-dataset …` arguments naming the held-out sets `specs` (the objective's first).

    >>> from hf_bomerge.objectives.heldout import HeldOutSpec
    >>> dataset_args([HeldOutSpec("org/set", None, "test"), HeldOutSpec("org/ood", "en", "validation")])
    ['--dataset', 'org/set', '--split', 'test', '--eval-dataset', 'org/ood:en@validation']
    """
    if not evaluate:
        return ["--no-eval"]
    args: list[str] = []
    for i, spec in enumerate(specs):
        local = Path(spec.dataset).expanduser().exists()
        if i == 0:
            args += ["--dataset", spec.dataset]
            if not local:
                args += (["--dataset-config", spec.config] if spec.config else []) + ["--split", spec.split]
        else:
            args += ["--eval-dataset", spec.dataset if local else spec.label]
    return args


def cached_default_config(dataset_id: str) -> str | None:
    """The config `datasets` would pick online for a dataset without one (its card's `default: true`, or its
    only config), read from the card in the HF cache. Offline, `datasets` refuses to pick one itself when
    several configs of the dataset are cached."""
    from huggingface_hub.repocard import metadata_load

    refs = cached_refs(dataset_id, repo_type="dataset")
    card = snapshot(dataset_id, refs.get("main", ""), repo_type="dataset") / "README.md"
    try:
        configs = (metadata_load(card) or {}).get("configs") or []
    except (OSError, ValueError):
        return None
    names = [c.get("config_name", "default") for c in configs if isinstance(c, dict)]
    chosen = [c.get("config_name", "default") for c in configs if isinstance(c, dict) and c.get("default")]
    return (chosen or (names if len(names) == 1 else []) or (["default"] if "default" in names else [None]))[0]
