"""A local folder as a source: its subfolders are the revisions (an HF Trainer output's `checkpoint-N`, or
branch-like names), pinned to fingerprints of their weight files; and when such a folder is completely written."""

from __future__ import annotations

import hashlib
import time
import zipfile
from pathlib import Path

from ..errors import CheckpointError, CorruptFileError, HubError, UnsafeFileError
from ..reading.formats import is_complete_safetensors
from ..reading.layout import WEIGHT_LAYOUTS, find_weight_files, shard_names, weight_layout
from .base import Arrival, Source, candidates, local_content_ids, register
from .dcp import holds_dcp


def is_git_repository(path: Path) -> bool:
    return (path / ".git").exists() or (path / "HEAD").is_file() and (path / "refs").is_dir()


@register
class FolderSource(Source):
    """A local folder whose subfolders are the revisions (HF Trainer `checkpoint-N`, or branch-like names).

    Pins are content fingerprints (names, sizes and mtimes of the weight files), so a changed folder is
    noticed when a study is resumed.
    """

    kind = "folder"

    @classmethod
    def claims(cls, spec: str) -> bool:
        path = Path(spec).expanduser()
        return path.is_dir() and not is_git_repository(path) and not holds_dcp(path)

    @classmethod
    def open(cls, spec: str, token: str | bool | None = None, cache_dir: str | Path | None = None) -> FolderSource:
        return cls(spec)

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        self.id = str(self.path)

    def refs(self) -> dict[str, str]:
        out = {}
        for sub in sorted(p for p in self.path.iterdir() if p.is_dir()):
            try:
                weights = find_weight_files(sub, f"Revision {sub.name} of {self.path}")
            except UnsafeFileError:
                raise
            except CheckpointError:  # a subfolder without weights (logs, runs/) is no revision
                continue
            digest = hashlib.sha256()
            for f in weights:
                st = f.stat()
                digest.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
            out[sub.name] = digest.hexdigest()[:40]
        if not out:
            raise HubError(f"{self.path} has no subfolders with model weights. A local source is a folder "
                           "of checkpoints, e.g. an HF Trainer output with checkpoint-N subfolders.")
        return out

    def fetch(self, name: str, pin: str, force: bool = False) -> Path:
        return self.path / name

    def all_content_ids(self, names: list[str], pins: list[str]) -> list[dict[str, str]]:
        """Each weight file by a sampled id, hashed whole only where two agree (`local_content_ids`)."""
        return local_content_ids([{f: self.path / n / f for f in self.weight_sizes(n, p)} for n, p in zip(names, pins)])

    def verify_pins(self, names: list[str], shas: list[str]) -> None:
        """A folder's pins are fingerprints of its files: a recorded one must still match."""
        current = self.refs()
        changed = [n for n, s in zip(names, shas) if current.get(n) != s]
        if changed:
            raise HubError(f"The checkpoint folders {changed} of {self.id} changed since the recipe was written; "
                           "the recipe cannot be reproduced from them.")

    def tokenizer_fallback(self, refs: dict[str, str]) -> Path | None:
        """The folder root (an HF Trainer output keeps the tokenizer there)."""
        return self.path

    def arrivals(self, *, settle: float = 0.0, exclude: Path | None = None,
                 cache: dict | None = None) -> list[Arrival]:
        """Every subfolder that looks like a checkpoint, complete or not (`folder_incomplete` says why not)."""
        skip = exclude.resolve() if exclude is not None else None
        subs = {p.name: p for p in self.path.iterdir() if p.is_dir() and p.resolve() != skip and _model_like(p)}
        return [Arrival(name, why == "", why) for name in candidates(subs)
                for why in [folder_incomplete(subs[name], settle)]]

    def listing(self, name: str, pin: str) -> dict[str, int]:
        return {p.name: p.stat().st_size for p in (self.path / name).iterdir() if p.is_file()}

    def read(self, name: str, pin: str, file: str) -> bytes:
        return (self.path / name / file).read_bytes()


def _model_like(folder: Path) -> bool:
    """A Trainer checkpoint, or a folder with a config or weights: an empty or unrelated folder is no revision."""
    return folder.name.startswith("checkpoint-") or any((folder / f).exists() for f in ("config.json", *WEIGHT_LAYOUTS))


def folder_incomplete(folder: Path, settle: float = 0.0) -> str:
    """Why `folder` is not a complete checkpoint yet ("" when it is)."""
    files = {p.name: p for p in folder.iterdir() if p.is_file()}
    layout = weight_layout(files)
    if "config.json" not in files or layout is None:
        return "no config.json yet" if "config.json" not in files else "no weights yet"
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
    if trainer_saving(files):
        return "no trainer_state.json yet (the Trainer is still saving)"
    newest = max(max(p.stat().st_mtime, p.stat().st_ctime) for p in files.values())
    if time.time() - newest < settle:
        return "changed less than a moment ago"
    return ""


# What only an HF Trainer writes into a checkpoint (before `trainer_state.json`, its last file). A folder without
# them is a plain accelerate or PyTorch loop's, which never writes `trainer_state.json`: its weights, complete and
# unchanged for `settle` seconds, are all there is to wait for.
TRAINER_FILES = ("training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")


def trainer_saving(files) -> bool:
    """Whether the folder is a Trainer checkpoint whose last file, `trainer_state.json`, is not written yet."""
    return "trainer_state.json" not in files and any(f in TRAINER_FILES or f.startswith("rng_state_") for f in files)


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


