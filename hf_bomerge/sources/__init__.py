"""Where checkpoints come from: the `Source` contract (`base`), its built-in kinds (a Hub repo's branches, a local
folder's subfolders, a folder of distributed checkpoints, a local git repository's branches) and the registry
that opens one from a SOURCE string.

>>> from hf_bomerge.sources import open_source
>>> [a.name for a in arrivals("./trainer-output") if a.ready]      # doctest: +SKIP
['checkpoint-500']
"""

from __future__ import annotations

from pathlib import Path

from ..errors import HubError
from .base import MERGE_SUFFIX, SIDE_FILES, SOURCES, TOKENIZER_FILES, Arrival, Source, default_cache_dir, register
from .dcp import DcpSource
from .folder import FolderSource, folder_incomplete
from .git import GitSource
from .hub import (
    HubSource,
    check_dataset_access,
    hub_errors,
    is_connection_error,
    local_cause,
    status_of,
    tokenizer_files,
)

__all__ = ["MERGE_SUFFIX", "SIDE_FILES", "SOURCES", "TOKENIZER_FILES", "Arrival", "DcpSource", "FolderSource", "GitSource",
           "HubSource", "Source", "arrivals", "check_dataset_access", "default_cache_dir", "folder_incomplete",
           "hub_errors", "is_connection_error", "local_cause", "open_source", "register", "source_class",
           "status_of", "tokenizer_files"]


def source_class(kind: str) -> type[Source]:
    """The registered class of `kind` (what a recipe or a result records as `source_kind`)."""
    found = next((cls for cls in SOURCES if cls.kind == kind), None)
    if found is None:
        raise HubError(f"Unknown source kind {kind!r}; this hf-bomerge reads {', '.join(c.kind for c in SOURCES)}.")
    return found


def open_source(source: str, token: str | bool | None = None, cache_dir: str | Path | None = None,
                **options) -> Source:
    """The source SOURCE names: a path that exists (a git repository, a folder of checkpoints) wins over a Hub
    repo id. `options` (`config`, `key_map`; None: not given) go to a kind that takes them, and are refused by one
    that does not.

    >>> open_source("EleutherAI/pythia-160m").kind    # doctest: +SKIP
    'hub'
    """
    for cls in SOURCES:
        if cls.claims(source):
            given = {k: v for k, v in options.items() if v is not None}
            unknown = sorted(set(given) - cls.options)
            if unknown:
                flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
                raise HubError(f"{flags} applies only to folders of distributed checkpoints (DCP); {source} is a "
                               f"{cls.kind} source, whose checkpoints carry their own config and names. Leave "
                               f"{flags} out.")
            return cls.open(source, token=token, cache_dir=cache_dir, **given)
    if Path(source).expanduser().exists():
        raise HubError(f"{source} is a file; SOURCE must be a Hub repo id or a folder of checkpoints.")
    raise HubError(f"{source!r} is neither an existing folder nor a Hub repo id of the form ORG/NAME.")


def arrivals(source: str, *, settle: float = 2.0, exclude: Path | None = None, token=None,
             cache: dict | None = None) -> list[Arrival]:
    """The revisions of a run that is still training, in training order, each marked ready (completely written)
    or not, and why (`Source.arrivals`). `exclude` is a folder never taken for a revision (the watch's own output
    inside the source); `cache` (a dict kept between calls) remembers pins found complete."""
    return open_source(source, token=token).arrivals(settle=settle, exclude=exclude, cache=cache)
