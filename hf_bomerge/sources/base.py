"""The `Source` contract: where the checkpoints of one training run come from, and the registry that opens one.

A source is one class. Everything outside `hf_bomerge.sources` talks to a `Source` through the methods below and
never asks which kind it is; a new kind of source (a cloud bucket, a distributed-checkpoint folder) is one
subclass registered with `@register`.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..errors import CorruptFileError, HubError
from ..reading.formats import TensorInfo, read_safetensors_header
from ..reading.layout import WEIGHT_LAYOUTS, shard_names, weight_layout
from .revisions import progress_key, sort_revisions

# What a merge reads besides weights. Never optimizer states or training_args pickles.
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja"]
SIDE_FILES = ["config.json", "generation_config.json", *TOKENIZER_FILES]
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's limit
MERGE_SUFFIX = "-bomerge"  # the branches `hf-bomerge watch --push-to-hub` writes: never revisions themselves


def default_cache_dir() -> Path:
    return Path(os.environ.get("HF_BOMERGE_CACHE", Path.home() / ".cache" / "hf_bomerge"))


@dataclass(frozen=True)
class Arrival:
    """One revision of a run that is still training: its name, whether it may be read, and if not, why."""

    name: str
    ready: bool
    why: str = ""


class Source(abc.ABC):
    """Where the revisions (checkpoints) of one training run come from.

    Who calls what: a run calls `refs()` once and uses its pins for every later step (a branch that moves during
    a run does not change the run). Every other method takes a revision's name (for messages) and its pin.

    Each kind implements:
    - `claims(spec)` / `open(spec, token, cache_dir, **options)`: whether a SOURCE string names this kind, and the
      source; `options` names the keywords of `SourceSpec` a kind takes (a DCP folder's `config`, `key_map`).
    - `refs()` -> {revision name: pin}: a pin is a commit id, or for plain folders a fingerprint of the weight
      files' names, sizes and mtimes; two pins are equal only if the revision's contents are.
    - `listing(name, pin)` -> {file: bytes} of the revision's top folder, without downloading anything.
    - `read(name, pin, file)` -> the bytes of one small file there (a shard index, config.json).
    - `fetch(name, pin, force=False)` -> a local folder holding what a merge reads (weights, config, tokenizer,
      model code) and nothing else; `force` replaces what is cached (`refetches` says whether that can help).
    May override (the defaults suit a source whose revisions are immutable commits on this machine):
    - `missing(name, pin)` -> what an offline run lacks of the revision ([] when nothing).
    - `verify_pins(names, shas)` raises when recorded pins (a recipe's, a study's) no longer read as recorded.
    - `readiness(name, pin)` -> "" when the revision is completely written, else why not; `arrivals(...)` the
      revisions of a run that is still training, each marked ready or not (for `watch`).
    - `tokenizer_fallback(refs)` -> a folder with the run's tokenizer when the latest revision has none.
    - `remember_for_offline()` keeps what a later offline run needs beyond the revisions; `license()`.
    - `card_fields(source_id)` -> how a published card names the source: {"name", "url", "base_model"} (a local
      source is named by its folder, never by a path of this machine).
    - `mergekit_model(source_id, sha, folder)` -> how a mergekit config names the revision (default: the local
      folder its files were read from) and a note for the config's header, or None.
    - `content_ids(name, pin)` -> {weight file: content id} without downloading (the default hashes the files
      of a source whose revisions are on this machine: sha256, remembered by path, size and mtime);
      `all_content_ids(names, pins)` all of them at once (a folder reads samples, and hashes only look-alikes).
    Derived, the same for every kind: `weight_files`, `weight_sizes`, `parameter_count`, `is_local`.
    """

    kind: ClassVar[str]
    options: ClassVar[frozenset[str]] = frozenset()  # keywords `open` takes beyond token and cache_dir
    refetches: ClassVar[bool] = False  # whether `fetch(force=True)` downloads a corrupt file again
    id: str

    @classmethod
    @abc.abstractmethod
    def claims(cls, spec: str) -> bool: ...

    @classmethod
    @abc.abstractmethod
    def open(cls, spec: str, token: str | bool | None = None, cache_dir: str | Path | None = None) -> Source: ...

    @abc.abstractmethod
    def refs(self) -> dict[str, str]: ...

    @abc.abstractmethod
    def listing(self, name: str, pin: str) -> dict[str, int]: ...

    @abc.abstractmethod
    def read(self, name: str, pin: str, file: str) -> bytes: ...

    @abc.abstractmethod
    def fetch(self, name: str, pin: str, force: bool = False) -> Path: ...

    def config(self, name: str, pin: str) -> dict:
        """The revision's config.json ({} when it has none)."""
        return json.loads(self.read(name, pin, "config.json")) if "config.json" in self.listing(name, pin) else {}

    def missing(self, name: str, pin: str) -> list[str]:
        return []

    def verify_pins(self, names: list[str], shas: list[str]) -> None:
        """Commits are immutable: a recorded commit id reads as it did."""

    def tokenizer_fallback(self, refs: dict[str, str]) -> Path | None:
        """The tokenizer of the run's `main` revision, if it has one."""
        return self.fetch("main", refs["main"]) if "main" in refs else None

    def remember_for_offline(self) -> None:
        """Nothing beyond the revisions themselves."""

    def license(self) -> str | None:
        return None

    @classmethod
    def card_fields(cls, source_id: str) -> dict:
        return {"name": Path(source_id).name, "url": None, "base_model": None}

    @classmethod
    def mergekit_model(cls, source_id: str, sha: str, folder: Path) -> tuple[str, str | None]:
        return str(Path(folder).absolute()), None

    def readiness(self, name: str, pin: str) -> str:
        files = self.listing(name, pin)
        if "config.json" not in files:
            return "no config.json yet"
        if weight_layout(files) is None:
            return "no weights yet"
        try:
            weights = self.weight_files(name, pin)
        except (HubError, CorruptFileError) as err:
            return f"{weight_layout(files)} cannot be read yet ({err})"
        missing = [f for f in weights if f not in files]
        return f"shard {missing[0]} is not written yet" if missing else ""

    def arrivals(self, *, settle: float = 0.0, exclude: Path | None = None,
                 cache: dict | None = None) -> list[Arrival]:
        """The revisions in training order (oldest first), each ready or not. `cache` (a dict kept between calls)
        remembers pins found complete: a pin's contents never change."""
        cache = {} if cache is None else cache
        refs = self.refs()
        out = []
        for name in candidates(refs):
            if cache.get(refs[name]) != "":
                cache[refs[name]] = self.readiness(name, refs[name])
            out.append(Arrival(name, cache[refs[name]] == "", cache[refs[name]]))
        return out

    # ---- derived: the same for every kind ----------------------------------------------------------------

    def weight_files(self, name: str, pin: str) -> list[str]:
        """The revision's weight files, as names in its top folder: the layout transformers would load, and
        for a sharded checkpoint its index followed by the shards the index names, each checked to be a file
        beside the index (`layout.shard_names`) before anything reads it."""
        known = vars(self).setdefault("_weight_files", {})  # a pin's files never change: one read of its index
        if (name, pin) not in known:
            layout = weight_layout(self.listing(name, pin))
            if layout is None:
                raise HubError(f"Revision {name} ({pin[:12]}) of {self.id} has no transformers weights "
                               f"({', '.join(WEIGHT_LAYOUTS)}); choose revisions that hold checkpoints.")
            shards = (shard_names(self.read(name, pin, layout), layout, f"Revision {name} of {self.id}")
                      if layout.endswith(".index.json") else [])
            known[name, pin] = [layout, *shards]
        return list(known[name, pin])

    def weight_sizes(self, name: str, pin: str) -> dict[str, int]:
        """{weight file: bytes} of the files that hold the revision's tensors (the index's shards, not the index);
        a shard the index names that the revision lacks is an error naming it."""
        listing = self.listing(name, pin)
        files = self.weight_files(name, pin)
        shards = files[1:] if files[0].endswith(".index.json") else files
        missing = [f for f in shards if f not in listing]
        if missing:
            raise HubError(f"Revision {name} of {self.id}: its {files[0]} names {missing[0]}, which the revision "
                           "does not have. The checkpoint is incomplete; choose another revision.")
        return {f: listing[f] for f in shards}

    def parameter_count(self, name: str, pin: str) -> tuple[int, int]:
        """(parameters, bytes they are stored in) of the revision, before downloading its weights: counted from
        each safetensors header's shapes (checked against the file's size in the listing), and for `.bin` files,
        which have no header to read first, their bytes at 2 per parameter (fp16/bf16: the most a file can hold
        of floating-point weights above 8 bits). Never from file names or the config's dtype."""
        params = stored = 0
        for file, size in self.weight_sizes(name, pin).items():
            if not file.endswith(".safetensors"):
                params, stored = params + size // 2, stored + size
                continue
            infos = self.safetensors_header(name, pin, file)
            data = sum(i.nbytes for i in infos)
            if not 0 <= size - 8 - data <= MAX_HEADER_BYTES:
                raise CorruptFileError(f"Revision {name} of {self.id}: the header of {file} describes {data} bytes "
                                       f"of tensors, but the file is {size} bytes: it is corrupt or crafted.")
            params, stored = params + sum(i.numel for i in infos), stored + data
        return params, stored

    def safetensors_header(self, name: str, pin: str, file: str) -> list[TensorInfo]:
        """The tensors a safetensors file of the revision declares, read from its header alone."""
        return [info for info, _ in read_safetensors_header(self.fetch(name, pin) / file)]

    def is_local(self, name: str, pin: str) -> bool:
        """Whether the revision's weights are on this machine already (nothing to download)."""
        return True

    def content_ids(self, name: str, pin: str) -> dict[str, str]:
        """{weight file (the shards, not an index): content id}: equal ids, equal bytes. Here the sha256 of each
        file of the revision's local folder (a source whose `fetch` downloads must override this)."""
        folder = self.fetch(name, pin)
        return {f: file_sha256(folder / f) for f in self.weight_sizes(name, pin)}

    def all_content_ids(self, names: list[str], pins: list[str]) -> list[dict[str, str]]:
        """`content_ids` of each revision (what the duplicates check compares)."""
        return [self.content_ids(n, p) for n, p in zip(names, pins)]


def listed_weights(listing) -> list[str]:
    """The weight files of a listing without reading a shard index: the single file of an unsharded layout, or
    the files named as its shards are (`model-00001-of-00002.safetensors` beside `model.safetensors.index.json`).
    A shard's own header (or pickle) names its tensors, so equal shards hold equal tensors whatever the index says."""
    layout = weight_layout(listing)
    if layout is None or not layout.endswith(".index.json"):
        return [] if layout is None else [layout]
    stem, ext = os.path.splitext(layout.removesuffix(".index.json"))
    return sorted(f for f in listing if f.startswith(stem + "-") and f.endswith(ext) and "/" not in f)


_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: a file is hashed once a run


def sampled_id(path: Path, blocks: int = 16, size: int = 1 << 16) -> str:
    """A cheap content id of a local file: its size and `blocks` blocks spread over it. Two checkpoints of one run
    differ there; equal sampled ids are only candidates, confirmed with `file_sha256`."""
    total = path.stat().st_size
    digest = hashlib.sha256(str(total).encode())
    with open(path, "rb") as f:
        for k in range(blocks):
            f.seek(max(0, (total - size) * k // max(blocks - 1, 1)))
            digest.update(f.read(size))
    return "sampled:" + digest.hexdigest()


def local_content_ids(paths: list[dict[str, Path]]) -> list[dict[str, str]]:
    """Each revision's {weight file: content id} for files on this machine: a sampled id (`sampled_id`: 1 MiB read
    per file), and the full sha256 only where two files' sampled ids agree: hashing every checkpoint whole cost
    more than the merge itself (2.4 s of a 3.65 GB run)."""
    sampled = [{f: sampled_id(path) for f, path in files.items()} for files in paths]
    seen = Counter(i for ids in sampled for i in ids.values())
    return [{f: file_sha256(files[f]) if seen[i] > 1 else i for f, i in ids.items()}
            for files, ids in zip(paths, sampled)]


def file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def candidates(names) -> list[str]:
    """The names that are revisions of the run, in training order: a training progress in the name, not a merge
    `watch` pushed, not a hidden or temporary folder."""
    keep = [n for n in names if progress_key(n) is not None and not n.endswith(MERGE_SUFFIX)
            and not n.startswith((".", "tmp-"))]
    return sort_revisions(keep)


SOURCES: list[type[Source]] = []  # asked in order: the first whose `claims` says yes opens the source


def register(cls: type[Source]) -> type[Source]:
    """Add a kind of source to the registry (a class decorator); `hf_bomerge.sources` registers the built-in
    kinds, whose `claims` exclude each other (a git repository is not a plain folder)."""
    SOURCES.append(cls)
    return cls
