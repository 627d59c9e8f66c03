"""Which revisions of a run exist while it trains, and which of them are completely written.

A revision still being written is never read: a local folder is complete when its config and weights are
all there and whole (a safetensors file as long as its header says, a zip-format `.bin` with its central
directory, every shard an index names), an HF Trainer `checkpoint-N` has its `trainer_state.json` (the
Trainer writes it after the weights), and nothing in it changed for `settle` seconds. A Hub branch is
complete when its commit lists config.json and every weight file (an index's shards may come in later
commits).

>>> from hf_bomerge.arrivals import arrivals
>>> [(a.name, a.ready) for a in arrivals("./trainer-output")]      # doctest: +SKIP
[('checkpoint-500', True), ('checkpoint-1000', False)]
"""

from __future__ import annotations

import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import CorruptFileError, HubError
from .formats import is_complete_safetensors
from .layout import WEIGHT_LAYOUTS, shard_names
from .layout import weight_layout as _layout
from .revisions import progress_key, sort_revisions

MERGE_SUFFIX = "-bomerge"  # the branches `hf-bomerge watch --push-to-hub` writes: never revisions themselves


@dataclass(frozen=True)
class Arrival:
    """One revision of the run: its name, whether it may be read, and if not, why."""

    name: str
    ready: bool
    why: str = ""


def arrivals(source: str, *, settle: float = 2.0, exclude: Path | None = None, token=None,
             cache: dict | None = None) -> list[Arrival]:
    """The revisions of `source` in training order (oldest first), each marked ready or not.

    `exclude` is a folder never taken for a revision (the watch's own output inside the source).
    `cache` (a dict kept between calls) remembers Hub commits found complete: a commit never changes.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return _folder_arrivals(path, settle, exclude)
    return _hub_arrivals(source, token, {} if cache is None else cache)


def _candidates(names) -> list[str]:
    keep = [n for n in names if progress_key(n) is not None and not n.endswith(MERGE_SUFFIX)
            and not n.startswith((".", "tmp-"))]
    return sort_revisions(keep)


def _folder_arrivals(root: Path, settle: float, exclude: Path | None) -> list[Arrival]:
    skip = exclude.resolve() if exclude is not None else None
    subs = {p.name: p for p in root.iterdir() if p.is_dir() and p.resolve() != skip and _model_like(p)}
    return [Arrival(name, why == "", why) for name in _candidates(subs)
            for why in [folder_incomplete(subs[name], settle)]]


def _model_like(folder: Path) -> bool:
    """A Trainer checkpoint, or a folder with a config or weights: an empty or unrelated folder is no revision."""
    return folder.name.startswith("checkpoint-") or any((folder / f).exists() for f in ("config.json", *WEIGHT_LAYOUTS))


def weight_layout(files) -> tuple[str | None, str]:
    """The weight layout among `files` (names), or why there is none yet; the same for a folder and a commit."""
    if "config.json" not in files:
        return None, "no config.json yet"
    layout = _layout(files)
    return layout, "" if layout else "no weights yet"


def folder_incomplete(folder: Path, settle: float = 0.0) -> str:
    """Why `folder` is not a complete checkpoint yet ("" when it is)."""
    files = {p.name: p for p in folder.iterdir() if p.is_file()}
    layout, why = weight_layout(files)
    if why:
        return why
    if layout.endswith(".index.json"):
        try:
            shards = shard_names(files[layout].read_bytes(), layout, folder.name)
        except (OSError, CorruptFileError):
            return f"{layout} is incomplete"
        missing = [s for s in shards if s not in files]
        if missing:
            return f"shard {missing[0]} is missing"
        weights = [files[s] for s in shards]
    else:
        weights = [files[layout]]
    for weight in weights:
        if not _whole(weight):
            return f"{weight.name} is still being written"
    if progress_key(folder.name) and folder.name.startswith("checkpoint-") and "trainer_state.json" not in files:
        return "no trainer_state.json yet (the Trainer is still saving)"
    newest = max(max(p.stat().st_mtime, p.stat().st_ctime) for p in files.values())
    if time.time() - newest < settle:
        return "changed less than a moment ago"
    return ""


def _whole(path: Path) -> bool:
    """A weight file written to its end: safetensors valid as the format requires; a zip `.bin` readable."""
    try:
        size = path.stat().st_size
        if path.suffix == ".safetensors":
            return is_complete_safetensors(path)
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                return all(info.header_offset < size for info in z.infolist())
        with open(path, "rb") as f:  # a legacy (pre-zip) torch.save pickle: only `settle` can tell
            return f.read(2) == b"\x80\x02"
    except (OSError, ValueError, zipfile.BadZipFile):
        return False


def _hub_arrivals(repo_id: str, token, cache: dict) -> list[Arrival]:
    from huggingface_hub import HfApi

    from .sources import hub_errors

    api = HfApi(token=token)
    with hub_errors(repo_id):
        refs = {b.name: b.target_commit for b in api.list_repo_refs(repo_id).branches}
    out = []
    for name in _candidates(refs):
        sha = refs[name]
        if cache.get(sha) != "":
            cache[sha] = _commit_incomplete(api, repo_id, name, sha, token)
        out.append(Arrival(name, cache[sha] == "", cache[sha]))
    return out


def _commit_incomplete(api, repo_id: str, name: str, sha: str, token) -> str:
    from huggingface_hub import RepoFile, hf_hub_download

    from .sources import hub_errors

    with hub_errors(repo_id, name):
        files = {e.path for e in api.list_repo_tree(repo_id, revision=sha) if isinstance(e, RepoFile)}
    layout, why = weight_layout(files)
    if why:
        return why
    if layout.endswith(".index.json"):
        try:
            with hub_errors(repo_id, name):
                index = hf_hub_download(repo_id, layout, revision=sha, token=token)
            shards = set(shard_names(Path(index).read_bytes(), layout, f"Branch {name} of {repo_id}"))
        except (HubError, CorruptFileError) as err:
            return f"{layout} cannot be read yet ({err})"
        missing = sorted(shards - files)
        if missing:
            return f"shard {missing[0]} is not pushed yet"
    return ""

