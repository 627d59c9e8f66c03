"""A local git repository as a source: its branches are the revisions, pinned to verified commit ids; only the
blobs a merge reads are extracted, streamed to disk."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import CorruptFileError, HubError
from ..reading.formats import ST_DTYPES, TensorInfo
from ..reading.layout import find_weight_files
from .base import MAX_HEADER_BYTES, SIDE_FILES, Source, default_cache_dir, register
from .folder import is_git_repository


@register
class GitSource(Source):
    """A local git repository; revisions are its branches, extracted once per commit into the cache.

    A pin (a branch's commit, or a recipe's or study's sha: data, not trusted) is used only once git confirms it is
    the full id of a commit here, so `--output=...` never reaches git as an option. Only the files a merge reads are
    extracted, each blob streamed to disk: an `optimizer.pt` beside the weights is never read.
    """

    kind = "git"

    @classmethod
    def claims(cls, spec: str) -> bool:
        return is_git_repository(Path(spec).expanduser())

    @classmethod
    def open(cls, spec: str, token: str | bool | None = None, cache_dir: str | Path | None = None) -> GitSource:
        return cls(Path(spec).expanduser(), cache_dir)

    @classmethod
    def mergekit_model(cls, source_id: str, sha: str, folder: Path) -> tuple[str, str | None]:
        """A branch has no folder mergekit could read: the folder hf-bomerge extracted its commit into."""
        return str(Path(folder).absolute()), (
            f"The revisions of the git repository {source_id} are read from the folders hf-bomerge extracted "
            "their commits into (its cache, one folder per commit); if the cache was cleared, running hf-bomerge "
            "on bomerge_recipe.yaml extracts them again.")

    def __init__(self, path: str | Path, cache_dir: str | Path | None = None):
        self.path = Path(path).resolve()
        self.id = str(self.path)
        self.cache_dir = Path(cache_dir or default_cache_dir()) / "git"
        self._trees: dict[str, dict[str, tuple[str, int]]] = {}  # verified pin -> {file: (blob id, size)}

    def _git(self, *args: str) -> bytes:
        return subprocess.run(["git", "-C", str(self.path), *args], check=True, capture_output=True).stdout

    def _tree(self, name: str, pin: str) -> dict[str, tuple[str, int]]:
        """The regular files of commit `pin`'s top folder, once `pin` is checked to be a full commit id here."""
        if pin not in self._trees:
            full = isinstance(pin, str) and re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", pin)
            found = full and subprocess.run(["git", "-C", str(self.path), "rev-parse", "--verify", "-q",
                                             "--end-of-options", f"{pin}^{{commit}}"], capture_output=True, check=False)
            if not full or found.returncode or found.stdout.decode().strip() != pin:
                raise HubError(f"The pin {pin!r} of revision {name!r} is not a commit of the git repository "
                               f"{self.path}: a pin must be the full id (40 or 64 hex digits) of one of its commits. "
                               "Check the shas in the recipe or study, or merge by branch names instead.")
            rows = [row.split("\t", 1) for row in self._git("ls-tree", "-l", "-z", "--end-of-options", pin)
                    .decode().split("\0") if row]
            self._trees[pin] = {path: (meta.split()[2], int(meta.split()[3])) for meta, path in rows
                                if meta.split()[0] in ("100644", "100755")}  # no symlinks, trees or submodules
        return self._trees[pin]

    def refs(self) -> dict[str, str]:
        lines = self._git("for-each-ref", "--format=%(refname:short) %(objectname)", "refs/heads").decode()
        return dict(line.split(" ", 1) for line in lines.splitlines() if line)

    def listing(self, name: str, pin: str) -> dict[str, int]:
        return {path: size for path, (_, size) in self._tree(name, pin).items()}

    def content_ids(self, name: str, pin: str) -> dict[str, str]:
        """The git blob ids of the weight files, from `ls-tree` (nothing extracted)."""
        return {f: self._tree(name, pin)[f][0] for f in self.weight_sizes(name, pin)}

    def read(self, name: str, pin: str, file: str) -> bytes:
        blob = self._tree(name, pin).get(file)
        if blob is None:
            raise HubError(f"Revision {name} ({pin[:12]}) of {self.path} has no {file}.")
        return self._git("cat-file", "blob", blob[0])

    def safetensors_header(self, name: str, pin: str, file: str) -> list[TensorInfo]:
        if self.is_local(name, pin):
            return super().safetensors_header(name, pin, file)
        blob = self._tree(name, pin)[file][0]
        with subprocess.Popen(["git", "-C", str(self.path), "cat-file", "blob", blob],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as proc:
            head = proc.stdout.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else -1
            raw = proc.stdout.read(size) if 0 < size <= MAX_HEADER_BYTES else b""
            proc.kill()
        try:
            header = json.loads(raw)
            header.pop("__metadata__", None)
            return [TensorInfo(k, tuple(v["shape"]), ST_DTYPES[v["dtype"]]) for k, v in header.items()]
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise CorruptFileError(f"Branch {name} of {self.path}: {file} has no valid safetensors header.") from err

    def is_local(self, name: str, pin: str) -> bool:
        self._tree(name, pin)
        return (self.cache_dir / pin).exists()

    def _wanted(self, name: str, pin: str) -> list[str]:
        """What a merge reads of the revision: config, tokenizer, model code, the weights (an index's shards)."""
        weights = self.weight_files(name, pin)  # an index's shards checked to be files beside it
        missing = [f for f in weights if f not in self._tree(name, pin)]
        if missing:
            raise HubError(f"Revision {name} ({pin[:12]}) of {self.path}: its {weights[0]} names {missing[0]}, "
                           "which the revision does not have. The checkpoint is incomplete; choose another revision.")
        return [f for f in self._tree(name, pin) if f in SIDE_FILES or f.endswith(".py")] + weights

    def fetch(self, name: str, pin: str, force: bool = False) -> Path:
        self._tree(name, pin)
        target = self.cache_dir / pin
        if force:
            shutil.rmtree(target, ignore_errors=True)
        if not target.exists():
            wanted = self._wanted(name, pin)
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=self.cache_dir))
            try:
                with subprocess.Popen(["git", "-C", str(self.path), "cat-file", "--batch"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE) as git:
                    for path in wanted:  # each blob by its id, copied to disk 1 MB at a time
                        git.stdin.write(self._trees[pin][path][0].encode() + b"\n")
                        git.stdin.flush()
                        left = int(git.stdout.readline().split()[2])
                        with open(staging / path, "wb") as out:
                            while left > 0:
                                chunk = git.stdout.read(min(left, 1 << 20))
                                if not chunk:
                                    raise HubError(f"git stopped while reading {path} of {name} in {self.path}.")
                                left -= out.write(chunk)
                        git.stdout.read(1)  # the newline after each blob
                    git.stdin.close()
                for weight in find_weight_files(staging):
                    with open(weight, "rb") as f:
                        if f.read(24).startswith(b"version https://git-lfs"):
                            raise HubError(f"{weight.name} on branch {name} of {self.path} is a git-lfs pointer; "
                                           "run `git lfs fetch --all` in that repository first.")
                staging.rename(target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return target
