"""Where checkpoints come from: a Hub repo's branches, a local folder's subfolders, a local git repo's
branches, and the Hub errors of reading them mapped to messages that say what to do (publishing is in
`hf_bomerge.publish`).

A source lists its revisions with a pin (the commit sha; a content fingerprint for plain folders) and
materializes one revision as a local folder holding only what a merge needs: weights, config, tokenizer.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)

from . import offline
from .errors import CheckpointError, CorruptFileError, HubError, UnsafeFileError
from .formats import ST_DTYPES, TensorInfo, read_safetensors_header
from .layout import WEIGHT_LAYOUTS, find_weight_files, shard_names, unsafe_reason, weight_layout

# What a merge reads besides weights. Never optimizer states or training_args pickles.
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja"]
SIDE_FILES = ["config.json", "generation_config.json", *TOKENIZER_FILES]
_log = logging.getLogger(__name__)
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's limit


def default_cache_dir() -> Path:
    return Path(os.environ.get("HF_BOMERGE_CACHE", Path.home() / ".cache" / "hf_bomerge"))


class Source:
    """Base: `refs()` → {revision name: pin}; `fetch(name, pin)` → local folder."""

    id: str
    kind: str

    def refs(self) -> dict[str, str]:
        raise NotImplementedError

    def fetch(self, name: str, pin: str, force: bool = False) -> Path:
        """The revision as a local folder; `force` downloads it again (a corrupt file in the cache)."""
        raise NotImplementedError

    def listing(self, name: str, pin: str) -> dict[str, int]:
        """{file: bytes} of the revision's top folder, without downloading it."""
        raise NotImplementedError

    def config(self, name: str, pin: str) -> dict:
        """The revision's config.json (a few bytes: fetched even for a plan)."""
        raise NotImplementedError

    def read(self, name: str, pin: str, file: str) -> bytes:
        """The bytes of one small file of the revision's top folder (a shard index), without the weights."""
        raise NotImplementedError

    def weight_files(self, name: str, pin: str) -> list[str]:
        """The revision's weight files, as names in its top folder: the layout transformers would load, and
        for a sharded checkpoint its index followed by the shards the index names, each checked to be a file
        beside the index (`layout.shard_names`) before anything reads it."""
        layout = weight_layout(self.listing(name, pin))
        if layout is None:
            raise HubError(f"Revision {name} ({pin[:12]}) of {self.id} has no transformers weights "
                           f"({', '.join(WEIGHT_LAYOUTS)}); choose revisions that hold checkpoints.")
        if not layout.endswith(".index.json"):
            return [layout]
        return [layout, *shard_names(self.read(name, pin, layout), layout, f"Revision {name} of {self.id}")]

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

    def is_local(self, name: str, pin: str, listing: dict[str, int]) -> bool:
        """Whether the revision's weights (named in its `listing`) are on this machine already."""
        return True

    def license(self) -> str | None:
        return None


class HubSource(Source):
    """A Hub model repo; revisions are its branches, pinned to their commit shas."""

    kind = "hub"

    def __init__(self, repo_id: str, token: str | bool | None = None, cache_dir: str | Path | None = None):
        self.id = repo_id
        self.token = token
        self.cache_dir = cache_dir
        self.api = HfApi(token=token)
        self._refs: dict[str, str] | None = None
        self._listings: dict[str, dict[str, int]] = {}

    def refs(self) -> dict[str, str]:
        if self._refs is None:  # one listing per run: every later step uses these pins
            if offline.is_offline():  # the branches the cache knows, as huggingface_hub resolves them offline
                self._refs = offline.cached_refs(self.id, self.cache_dir)
                if not self._refs:
                    raise offline.OfflineError(
                        f"Offline (HF_HUB_OFFLINE=1) and the cache holds no branch of {self.id}: fetch its revisions "
                        f"on a connected machine first, e.g. `{offline.download_command(self.id, 'last:2')}`.")
                return self._refs
            with hub_errors(self.id):
                refs = self.api.list_repo_refs(self.id)
            self._refs = {b.name: b.target_commit for b in refs.branches}
        return self._refs

    def fetch(self, name: str, pin: str, force: bool = False) -> Path:
        if offline.is_offline():
            missing = self.missing(name, pin)
            if missing:
                raise offline.OfflineError(f"Offline (HF_HUB_OFFLINE=1) and {name} ({pin[:12]}) of {self.id} lacks "
                                           f"{', '.join(missing)} in the cache.")
            return offline.snapshot(self.id, pin, self.cache_dir)
        with hub_errors(self.id, name):
            files = list(self.listing(name, pin))
            weights = self.weight_files(name, pin)
            wanted = [f for f in files if (f in SIDE_FILES or f.endswith(".py")) and not unsafe_reason(f)] + weights
            folder = snapshot_download(self.id, revision=pin, allow_patterns=wanted, token=self.token,
                                       cache_dir=self.cache_dir, force_download=force)
        offline.record_ref(self.id, name, pin, self.cache_dir)  # so that an offline run can resolve `name`
        return Path(folder)

    def missing(self, name: str, pin: str) -> list[str]:
        """What the cache lacks of revision `pin` for a merge: [] when config and every weight file are there."""
        files = offline.cached_listing(self.id, pin, self.cache_dir)
        if not files:
            return ["all its files"]
        lacking = [] if "config.json" in files else ["config.json"]
        if weight_layout(files) is None:
            return [*lacking, "its weights"]
        return lacking + [f for f in self.weight_files(name, pin) if f not in files]

    def listing(self, name: str, pin: str) -> dict[str, int]:
        from huggingface_hub import RepoFile

        if pin not in self._listings and offline.is_offline():
            self._listings[pin] = offline.cached_listing(self.id, pin, self.cache_dir)
        if pin not in self._listings:  # the plan and the download read the same listing
            with hub_errors(self.id, name):
                tree = self.api.list_repo_tree(self.id, revision=pin)
                self._listings[pin] = {e.path: e.size for e in tree if isinstance(e, RepoFile)}
        return self._listings[pin]

    def config(self, name: str, pin: str) -> dict:
        return json.loads(self.read(name, pin, "config.json"))

    def read(self, name: str, pin: str, file: str) -> bytes:
        if offline.is_offline():
            path = offline.snapshot(self.id, pin, self.cache_dir) / file
            if not path.is_file():
                raise offline.OfflineError(f"Offline (HF_HUB_OFFLINE=1) and {name} ({pin[:12]}) of {self.id} lacks "
                                           f"{file} in the cache.")
            return path.read_bytes()
        with hub_errors(self.id, name):
            return Path(hf_hub_download(self.id, file, revision=pin, token=self.token,
                                        cache_dir=self.cache_dir)).read_bytes()

    def safetensors_header(self, name: str, pin: str, file: str) -> list[TensorInfo]:
        if offline.is_offline():
            return super().safetensors_header(name, pin, file)
        from huggingface_hub.errors import SafetensorsParsingError

        try:
            with hub_errors(self.id, name):
                meta = self.api.parse_safetensors_file_metadata(self.id, file, revision=pin, token=self.token)
        except SafetensorsParsingError as err:
            raise CorruptFileError(f"Revision {name} of {self.id}: {file} has no valid safetensors header "
                                   f"({err}).") from err
        infos = []
        for tensor, info in meta.tensors.items():
            if info.dtype not in ST_DTYPES or any(not isinstance(d, int) or d < 0 for d in info.shape):
                raise CorruptFileError(f"Revision {name} of {self.id}: {file} declares tensor {tensor!r} as "
                                       f"{info.dtype} {info.shape}, which is not a tensor hf-bomerge can read.")
            infos.append(TensorInfo(tensor, tuple(info.shape), ST_DTYPES[info.dtype]))
        return infos

    def is_local(self, name: str, pin: str, listing: dict[str, int]) -> bool:
        from huggingface_hub import try_to_load_from_cache

        files = self.weight_sizes(name, pin)
        return all(isinstance(try_to_load_from_cache(self.id, f, revision=pin, cache_dir=self.cache_dir), str)
                   for f in files)

    def license(self) -> str | None:
        """The license in the source repo's model card (main branch), carried over to the merge's card."""
        from huggingface_hub.repocard import metadata_load

        try:
            main = self.refs().get("main")
            path = hf_hub_download(self.id, "README.md", revision=main, token=self.token, cache_dir=self.cache_dir)
            # metadata_load, not ModelCard.load: a card without a metadata block is normal here, and
            # ModelCard.load warns about it on stderr ("Repo card metadata block was not found").
            return (metadata_load(path) or {}).get("license")
        except Exception:  # no card, or one without metadata: the merge's card then names no license
            return None


class FolderSource(Source):
    """A local folder whose subfolders are the revisions (HF Trainer `checkpoint-N`, or branch-like names).

    Pins are content fingerprints (names, sizes and mtimes of the weight files), so a changed folder is
    noticed when a study is resumed.
    """

    kind = "folder"

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

    def listing(self, name: str, pin: str) -> dict[str, int]:
        return {p.name: p.stat().st_size for p in (self.path / name).iterdir() if p.is_file()}

    def config(self, name: str, pin: str) -> dict:
        config = self.path / name / "config.json"
        return json.loads(config.read_text()) if config.is_file() else {}

    def read(self, name: str, pin: str, file: str) -> bytes:
        return (self.path / name / file).read_bytes()


class GitSource(Source):
    """A local git repository; revisions are its branches, extracted once per commit into the cache.

    A pin (a branch's commit, or a recipe's or study's sha: data, not trusted) is used only once git confirms it is
    the full id of a commit here, so `--output=...` never reaches git as an option. Only the files a merge reads are
    extracted, each blob streamed to disk: an `optimizer.pt` beside the weights is never read.
    """

    kind = "git"

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

    def config(self, name: str, pin: str) -> dict:
        return json.loads(self.read(name, pin, "config.json")) if "config.json" in self._tree(name, pin) else {}

    def read(self, name: str, pin: str, file: str) -> bytes:
        blob = self._tree(name, pin).get(file)
        if blob is None:
            raise HubError(f"Revision {name} ({pin[:12]}) of {self.path} has no {file}.")
        return self._git("cat-file", "blob", blob[0])

    def safetensors_header(self, name: str, pin: str, file: str) -> list[TensorInfo]:
        if self.is_local(name, pin, {}):
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

    def is_local(self, name: str, pin: str, listing: dict[str, int]) -> bool:
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


def open_source(source: str, token: str | bool | None = None, cache_dir: str | Path | None = None) -> Source:
    """A path that exists wins; otherwise SOURCE is a Hub repo id.

    >>> open_source("EleutherAI/pythia-160m").kind    # doctest: +SKIP
    'hub'
    """
    path = Path(source).expanduser()
    if path.exists():
        if (path / ".git").exists() or (path / "HEAD").is_file() and (path / "refs").is_dir():
            return GitSource(path, cache_dir)
        if path.is_dir():
            return FolderSource(path)
        raise HubError(f"{source} is a file; SOURCE must be a Hub repo id or a folder of checkpoints.")
    if source.count("/") != 1 or source.startswith(("/", ".", "~")):
        raise HubError(f"{source!r} is neither an existing folder nor a Hub repo id of the form ORG/NAME.")
    return HubSource(source, token=token, cache_dir=cache_dir)


class hub_errors:
    """Turn huggingface_hub's exceptions into one-paragraph errors that say what to do."""

    def __init__(self, repo_id: str, revision: str | None = None):
        self.repo_id, self.revision = repo_id, revision

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        local = local_cause(err) if err is not None else None
        if err is None or not (local or isinstance(err, (HfHubHTTPError, LocalEntryNotFoundError, OSError))
                               or is_connection_error(err)):
            return False
        if local:
            msg = local
        elif type(err).__name__ == "OfflineModeIsEnabled" or isinstance(err, LocalEntryNotFoundError) \
                and offline.is_offline():
            msg = (f"Offline (HF_HUB_OFFLINE=1) and {self.repo_id}{' @ ' + self.revision if self.revision else ''} "
                   f"is not in the cache ({err}). Fetch it on a connected machine with "
                   f"`{offline.download_command(self.repo_id, self.revision or 'last:2')}`.")
        elif is_connection_error(err) and not isinstance(err, HfHubHTTPError):
            msg = (f"Could not connect to {os.environ.get('HF_ENDPOINT', 'the Hub')} to reach {self.repo_id} "
                   f"({type(err).__name__}). Check the network (or HF_ENDPOINT); to run from what is already "
                   "downloaded, set HF_HUB_OFFLINE=1 (see `hf-bomerge download` for a machine without network).")
        elif isinstance(err, GatedRepoError):
            msg = (f"{self.repo_id} is gated: accept its terms on the Hub and pass a token "
                   "(--token, HF_TOKEN or `hf auth login`).")
        elif isinstance(err, RepositoryNotFoundError) or (self.revision is None and status_of(err) in (401, 403, 404)):
            msg = (f"Repository {self.repo_id} was not found on {os.environ.get('HF_ENDPOINT', 'the Hub')}, or it is "
                   "private and no valid token was given: check the id, or pass --token / set HF_TOKEN.")
        elif isinstance(err, RevisionNotFoundError):
            msg = f"Revision {self.revision} of {self.repo_id} does not exist (any more)."
        else:
            msg = f"Could not reach {self.repo_id}{' @ ' + self.revision if self.revision else ''}: {err}"
        raise HubError(msg) from err


def check_dataset_access(dataset: str, token: str | bool | None) -> None:
    """A Hub dataset must be readable with `token` (the one the models get) before it is used: a private
    dataset already in a shared cache (the tokenized blocks, or `datasets`' own cache, which it falls back to
    when the Hub refuses) must not serve someone who may not read it, e.g. a Space's user. Offline, local
    paths and network trouble pass (loading the dataset reports the latter)."""
    from .errors import DataError

    if offline.is_offline() or Path(dataset).expanduser().exists():
        return
    try:
        HfApi(token=token).dataset_info(dataset, revision="main")
    except (RepositoryNotFoundError, HfHubHTTPError) as err:
        if isinstance(err, RepositoryNotFoundError) or status_of(err) in (401, 403, 404):
            raise DataError(f"The held-out dataset {dataset} was not found, or it is private or gated and the token "
                            "given cannot read it: check --dataset, or pass --token / set HF_TOKEN with access to "
                            "it.") from err
    except Exception:  # noqa: BLE001 - a network problem: loading the dataset reports it
        return


def local_cause(err: BaseException) -> str | None:
    """A message for an error of this machine (full disk, no permission, read-only file system) met while
    downloading or writing: it is not the Hub's fault, and the message must not say so."""
    seen = err
    while seen is not None and not (isinstance(seen, OSError) and seen.errno in _LOCAL_ERRNOS):
        seen = seen.__cause__ or seen.__context__
    if seen is None:
        return None
    where = f" ({seen.filename})" if getattr(seen, "filename", None) else ""
    if seen.errno == errno.ENOSPC:
        return (f"The disk is full{where}: free some space, or choose another --cache-dir (HF_HOME) or --output "
                "on a disk with room.")
    return (f"No permission to write{where} ({os.strerror(seen.errno)}): choose a --cache-dir (or HF_HOME) and "
            "--output you can write to, or fix the folder's permissions.")


_LOCAL_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS}


def status_of(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def is_connection_error(err: BaseException) -> bool:
    """Connection resets, refusals and timeouts, whichever HTTP library huggingface_hub uses."""
    names = {c.__name__ for c in type(err).__mro__}
    return bool(names & {"TransportError", "ConnectionError", "Timeout", "TimeoutError"})
