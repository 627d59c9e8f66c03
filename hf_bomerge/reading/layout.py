"""Which files of a revision hold its weights: the layout (transformers' order of preference) and, for a sharded
checkpoint, the shards its index names, each checked to be a file beside the index.

An index (`*.index.json`) is data from the internet: its `weight_map` values could be absolute paths or `../`
paths, and joining them to the revision's folder unchecked would read any file of this machine into the merge.
So every name an index gives is checked here, before any byte of it is read, for every source (Hub, folder,
git, offline cache) and every reader (the plan, the download, `watch`, the merge). Only the names are judged,
never where they resolve: HF cache snapshots are symlinks into `blobs/`, which is normal.

>>> shard_names(b'{"weight_map": {"a": "model-1.safetensors", "b": "model-1.safetensors"}}',
...             "model.safetensors.index.json", "step1")
['model-1.safetensors']
>>> shard_names(b'{"weight_map": {"a": "/etc/passwd"}}', "model.safetensors.index.json", "step1")
Traceback (most recent call last):
...
hf_bomerge.errors.UnsafeFileError: step1: model.safetensors.index.json names the weight file '/etc/passwd', which is not a file beside the index (an absolute path). hf-bomerge reads only files inside a revision; this index is malformed or hostile: do not merge this revision.
"""  # noqa: E501 - a doctest shows the whole message

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

from ..errors import CheckpointError, CorruptFileError, UnsafeFileError

# Weight files in order of preference, as transformers looks for them.
WEIGHT_LAYOUTS = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def weight_layout(files: Collection[str]) -> str | None:
    """The first of `WEIGHT_LAYOUTS` among `files` (names in the revision's top folder), or None."""
    return next((name for name in WEIGHT_LAYOUTS if name in files), None)


def unsafe_reason(name: object) -> str | None:
    """Why `name` is not a plain file name beside an index (None when it is one)."""
    if not isinstance(name, str) or not name:
        return "not a file name"
    if name.startswith(("/", "\\")):
        return "an absolute path"
    if "\\" in name or ":" in name:  # Windows separators, drives (C:), URLs (file://, https://)
        return "a path with a drive, a URL scheme or a backslash"
    if any(ord(c) < 32 for c in name) or any(c in name for c in "*?[]"):
        return "a name with control or wildcard characters"  # a wildcard would widen the download's patterns
    if "/" in name:
        return "a path outside the index's folder" if ".." in name.split("/") else "a path into a subfolder"
    if name in (".", ".."):
        return "a path outside the index's folder"
    return None


def shard_names(index: bytes | str, layout: str, where: str) -> list[str]:
    """The weight files `index` (the text of the file `layout`, e.g. `model.safetensors.index.json`) names, in
    order, once each; `where` names the revision in messages. Anything but plain file names of the index's own
    format beside it is refused (`UnsafeFileError`), and an index that is not one (`CorruptFileError`)."""
    try:
        data = json.loads(index)
    except ValueError as err:
        raise CorruptFileError(f"{where}: {layout} is not valid JSON ({err}). The revision is incomplete or "
                               "corrupt; delete it from the cache and download it again.") from err
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptFileError(f"{where}: {layout} has no `weight_map` object naming the shards, so the "
                               "checkpoint's files are unknown. The revision is not a transformers checkpoint.")
    suffix = "." + layout.removesuffix(".index.json").rsplit(".", 1)[1]
    names = list(dict.fromkeys(weight_map.values()))
    for name in names:
        why = unsafe_reason(name) or (None if name.endswith(suffix) else f"not a {suffix} file")
        if why:
            raise UnsafeFileError(
                f"{where}: {layout} names the weight file {name!r}, which is not a file beside the index ({why}). "
                "hf-bomerge reads only files inside a revision; this index is malformed or hostile: do not merge "
                "this revision.")
    return names


def find_weight_files(folder: str | Path, label: str | None = None) -> list[Path]:
    """The weight files of one checkpoint folder, in transformers' order of preference (for an index, the
    shards it names, checked by `shard_names`).

    Only weights are listed: an HF Trainer folder's `optimizer.pt` or `training_args.bin` are never opened.
    """
    folder = Path(folder)
    layout = next((name for name in WEIGHT_LAYOUTS if (folder / name).is_file()), None)
    if layout is None:
        raise CheckpointError(
            f"No model weights in {folder}: expected one of {', '.join(WEIGHT_LAYOUTS)}. "
            "Point hf-bomerge at a folder (or revision) that holds a transformers checkpoint.")
    if not layout.endswith(".index.json"):
        return [folder / layout]
    return [folder / name for name in shard_names((folder / layout).read_bytes(), layout, label or str(folder))]
