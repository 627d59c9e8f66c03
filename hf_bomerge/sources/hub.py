"""A Hub model repo as a source (its branches are the revisions, pinned to their commit shas), and the Hub's
errors mapped to messages that say what to do."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ..errors import CorruptFileError, DataError, HubError
from ..reading.formats import ST_DTYPES, TensorInfo
from ..reading.layout import unsafe_reason, weight_layout
from . import offline
from .base import SIDE_FILES, TOKENIZER_FILES, Source, listed_weights, register


@register
class HubSource(Source):
    """A Hub model repo; revisions are its branches, pinned to their commit shas."""

    kind = "hub"
    refetches = True

    @classmethod
    def claims(cls, spec: str) -> bool:
        return not Path(spec).expanduser().exists() and spec.count("/") == 1 and not spec.startswith(("/", ".", "~"))

    @classmethod
    def open(cls, spec: str, token: str | bool | None = None, cache_dir: str | Path | None = None) -> HubSource:
        return cls(spec, token=token, cache_dir=cache_dir)

    @classmethod
    def card_fields(cls, source_id: str) -> dict:
        return {"name": source_id, "url": f"https://huggingface.co/{source_id}", "base_model": source_id}

    @classmethod
    def mergekit_model(cls, source_id: str, sha: str, folder: Path) -> tuple[str, str | None]:
        return f"{source_id}@{sha}", None  # mergekit downloads the pinned commit itself (through HF_ENDPOINT)

    def __init__(self, repo_id: str, token: str | bool | None = None, cache_dir: str | Path | None = None):
        self.id = repo_id
        self.token = token
        self.cache_dir = cache_dir
        self.api = HfApi(token=token)
        self._refs: dict[str, str] | None = None
        self._listings: dict[str, dict[str, int]] = {}
        self._ids: dict[str, dict[str, str]] = {}  # pin -> {file: LFS sha256, else git blob id}, from the listing

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
                tree = [e for e in self.api.list_repo_tree(self.id, revision=pin) if isinstance(e, RepoFile)]
                self._listings[pin] = {e.path: e.size for e in tree}
                self._ids[pin] = {e.path: (e.lfs.sha256 if e.lfs else None) or e.blob_id for e in tree}
        return self._listings[pin]

    def content_ids(self, name: str, pin: str) -> dict[str, str]:
        """The weight files' LFS sha256 (else git blob id) from the tree listing; offline, the cache's blob names
        (a snapshot's files link to blobs/<id>). Nothing is downloaded, not even a shard index: the shards are
        the listing's files named as the index's layout names them (`listed_weights`)."""
        files = listed_weights(self.listing(name, pin)) or self.weight_sizes(name, pin)
        if offline.is_offline():
            folder = offline.snapshot(self.id, pin, self.cache_dir)
            return {f: (folder / f).resolve().name for f in files}
        return {f: self._ids[pin][f] for f in files}

    def config(self, name: str, pin: str) -> dict:
        return json.loads(self.read(name, pin, "config.json"))

    def tokenizer_fallback(self, refs: dict[str, str]) -> Path | None:
        """Only the tokenizer files of `main`, not its weights (offline: from the cache)."""
        if offline.is_offline():
            refs = offline.cached_refs(self.id, self.cache_dir)
        return tokenizer_files(self.id, refs["main"], self.token, self.cache_dir) if "main" in refs else None

    def remember_for_offline(self) -> None:
        """The `main` branch (an offline run resolves it from the cache) and its card (the license)."""
        main = self.refs().get("main")
        if main:
            offline.record_ref(self.id, "main", main, self.cache_dir)
        self.license()

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

    def is_local(self, name: str, pin: str) -> bool:
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


def tokenizer_files(repo_id: str, revision: str, token, cache_dir) -> Path | None:
    """The tokenizer files (only those) of a Hub repo's `revision`, downloaded or, offline, from the cache."""
    if offline.is_offline():
        refs = offline.cached_refs(repo_id, cache_dir)
        folder = offline.snapshot(repo_id, refs.get(revision, revision), cache_dir)
        return folder if folder.is_dir() else None
    with hub_errors(repo_id, revision):
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=TOKENIZER_FILES, token=token,
                                      cache_dir=cache_dir))


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
    if offline.is_offline() or Path(dataset).expanduser().exists():
        return
    try:
        HfApi(token=token).dataset_info(dataset, revision="main")
    except (RepositoryNotFoundError, HfHubHTTPError) as err:
        if isinstance(err, RepositoryNotFoundError) or status_of(err) in (401, 403, 404):
            raise DataError(f"The held-out dataset {dataset} was not found, or it is private or gated and the token "
                            "given cannot read it: check --dataset, or pass --token / set HF_TOKEN with access to "
                            "it.") from err
    except Exception:
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
