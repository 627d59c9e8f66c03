"""A local folder of distributed checkpoints (torch.distributed.checkpoint, DCP) as a source.

Its subfolders are the revisions: an HF Trainer / accelerate FSDP run's `checkpoint-N/pytorch_model_fsdp_0/` (keys
`model.*`, the config and tokenizer in `checkpoint-N/`), or plain DCP folders (torchtitan's `step-N/`, OLMo-core's
`stepN/model_and_optim/`) evaluated with `--config` and mapped to its names with `--key-map`. `fetch` writes a
small view of a revision into the cache (its config, tokenizer and `reading.dcp.POINTER`: the DCP folder and which
of its keys are the model's, under which names); the weights stay where the run wrote them and are read from there,
tensor by tensor (`reading.dcp.DcpCheckpoint`). Optimizer state and everything else the map does not select is
never read.

>>> open_source("./fsdp-run").kind        # doctest: +SKIP
'dcp'
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

from ..errors import CheckpointError, CorruptFileError, HubError, OptionError, UnsafeFileError
from ..reading import trainer_state
from ..reading.dcp import METADATA, POINTER, is_dcp_folder, read_metadata, tensor_chunks
from ..reading.keymap import load_key_map, resolve_transforms, select
from .base import SIDE_FILES, Arrival, Source, candidates, default_cache_dir, local_content_ids, register

DCP_SUBFOLDERS = ("pytorch_model_fsdp_0", "model_and_optim", "model")  # accelerate FSDP, OLMo-core, others


def dcp_folder(revision: Path) -> Path | None:
    """The DCP folder of a revision: the folder itself, or its accelerate / OLMo-core model subfolder."""
    if is_dcp_folder(revision):
        return revision
    return next((revision / n for n in DCP_SUBFOLDERS if is_dcp_folder(revision / n)), None)


def holds_dcp(path: Path) -> bool:
    """Whether some subfolder of `path` is (or holds) a DCP checkpoint."""
    try:
        return any(p.is_dir() and dcp_folder(p) is not None for p in path.iterdir())
    except OSError:
        return False


def dcp_incomplete(revision: Path, settle: float = 0.0) -> str:
    """Why a revision's DCP checkpoint is not completely written yet ("" when it is). DCP writes `.metadata` last,
    after every storage file: without it, or while it names a file or byte range that is not there, it is not."""
    folder = dcp_folder(revision)
    if folder is None or not (folder / METADATA).is_file():
        return f"no {METADATA} yet (the checkpoint is still being written)"
    try:
        entries, storage = read_metadata(folder)
        for key, entry in entries.items():
            if type(entry).__name__ == "TensorStorageMetadata":
                tensor_chunks(folder, key, entry, storage)
    except UnsafeFileError:
        raise
    except (CorruptFileError, CheckpointError) as err:
        return f"{METADATA} is not complete ({err})"
    files = [p for p in folder.iterdir() if p.is_file()]
    newest = max(max(p.stat().st_mtime, p.stat().st_ctime) for p in files)
    if time.time() - newest < settle:
        return "changed less than a moment ago"
    return ""


@register
class DcpSource(Source):
    """A local folder whose subfolders are DCP checkpoints; pins are fingerprints of their files, the config
    and the key map (a changed one is noticed when a study is resumed)."""

    kind = "dcp"
    options = frozenset({"config", "key_map"})

    @classmethod
    def claims(cls, spec: str) -> bool:
        path = Path(spec).expanduser()
        is_git = (path / ".git").exists() or (path / "HEAD").is_file() and (path / "refs").is_dir()
        return path.is_dir() and not is_git and holds_dcp(path)

    @classmethod
    def open(cls, spec: str, token: str | bool | None = None, cache_dir: str | Path | None = None,
             config: str | None = None, key_map: str | None = None) -> DcpSource:
        return cls(spec, cache_dir, config, key_map)

    @classmethod
    def mergekit_model(cls, source_id: str, sha: str, folder: Path) -> tuple[str, str | None]:
        """mergekit reads transformers folders, not DCP: the entry names the revision's view, and the note says so."""
        return str(Path(folder).absolute()), (
            f"The revisions of {source_id} are distributed checkpoints (torch.distributed.checkpoint), which mergekit "
            "does not read: these entries name the views hf-bomerge made of them (config and tokenizer only). To run "
            "mergekit, consolidate each revision into a transformers folder first and point its entry there.")

    def __init__(self, path: str | Path, cache_dir=None, config: str | None = None, key_map: str | None = None):
        self.path = Path(path).resolve()
        self.id = str(self.path)
        self.cache = Path(cache_dir or default_cache_dir()) / "dcp-views" / hashlib.sha256(
            self.id.encode()).hexdigest()[:16]
        self.config_path = self._config_path(config) if config else None
        self.key_map = key_map
        self.map_text, self.rules = load_key_map(key_map) if key_map else (None, None)

    @staticmethod
    def _config_path(spec: str) -> Path:
        path = Path(spec).expanduser().resolve()
        found = path / "config.json" if path.is_dir() else path
        if not found.is_file():
            raise OptionError(f"--config {spec}: no config.json there. Pass an HF config folder or config.json file "
                              "describing the model the run trains.")
        return found

    def _side_folder(self, name: str) -> Path:
        """Where the revision's config and tokenizer come from: `--config`'s folder, else the revision's own."""
        return self.config_path.parent if self.config_path else self.path / name

    def _config_file(self, name: str) -> Path:
        found = self.config_path or self.path / name / "config.json"
        if not found.is_file():
            raise HubError(f"Revision {name} of {self.id} is a distributed checkpoint without a config.json beside "
                           "it: pass --config (an HF config folder or file of the model the run trains) and, if its "
                           "names are not the config's, --key-map.")
        return found

    def refs(self) -> dict[str, str]:
        out = {}
        extra = (self.config_path.read_bytes() if self.config_path else b"") + (self.map_text or "").encode()
        for sub in sorted(p for p in self.path.iterdir() if p.is_dir()):
            folder = dcp_folder(sub)
            if folder is None or not (folder / METADATA).is_file():
                continue
            digest = hashlib.sha256(extra)
            for f in sorted(p for p in folder.iterdir() if p.is_file()):
                st = f.stat()
                digest.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
            if (sub / "config.json").is_file():
                digest.update((sub / "config.json").read_bytes())
            out[sub.name] = digest.hexdigest()[:40]
        if not out:
            raise HubError(f"{self.path} has no complete distributed checkpoints (a subfolder with {METADATA}).")
        return out

    def _selection(self, name: str) -> tuple[Path, dict, dict]:
        """(the DCP folder, {HF name: run key}, {HF name: transform}) of a revision (read once per source: a
        complete DCP checkpoint does not change)."""
        known = vars(self).setdefault("_selected", {})
        if name not in known:
            known[name] = self._select(name)
        return known[name]

    def _select(self, name: str) -> tuple[Path, dict, dict]:
        folder = dcp_folder(self.path / name)
        if folder is None:
            raise HubError(f"Revision {name} of {self.id} holds no distributed checkpoint.")
        entries, storage = read_metadata(folder)
        tensors = [k for k, e in entries.items() if type(e).__name__ == "TensorStorageMetadata"]
        rules = self.rules or self._default_rules(folder, tensors)
        where = f"Revision {name} of {self.id}"
        selected = select(rules, tensors, where)
        config = json.loads(self._config_file(name).read_text())
        if config.get("tie_word_embeddings") and "lm_head.weight" in selected:
            del selected["lm_head.weight"]  # tied to the embedding: merged once, as transformers saves it
        shapes = {n: tuple(entries[k].size) for n, (k, _) in selected.items()}
        return folder, {n: k for n, (k, _) in selected.items()}, resolve_transforms(selected, config, shapes, where)

    def _default_rules(self, folder: Path, tensors: list[str]):
        if folder.name == "pytorch_model_fsdp_0" or all(k.startswith("model.") for k in tensors):
            return load_key_map("accelerate")[1]
        if "tok_embeddings.weight" in tensors:
            return load_key_map("torchtitan-llama")[1]
        raise HubError(f"The distributed checkpoints of {self.id} use their own tensor names (e.g. {tensors[0]!r}); "
                       "pass --key-map FILE mapping them to the names of the --config model (rules "
                       "`RUN_NAME = HF_NAME`, `*` for any part).")

    def listing(self, name: str, pin: str) -> dict[str, int]:
        folder = dcp_folder(self.path / name)
        out = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()} if folder else {}
        side = self._side_folder(name)
        out.update({f: (side / f).stat().st_size for f in SIDE_FILES if (side / f).is_file()})
        if self.config_path:
            out["config.json"] = self.config_path.stat().st_size
        return out

    def read(self, name: str, pin: str, file: str) -> bytes:
        if file == "config.json":
            return self._config_file(name).read_bytes()
        return (self._side_folder(name) / file).read_bytes()

    def fetch(self, name: str, pin: str, force: bool = False) -> Path:
        """The revision's view in the cache: config, generation config, tokenizer and the Trainer's
        `trainer_state.json` copied, `POINTER` written."""
        view = self.cache / name
        pointer = view / POINTER
        if not force and pointer.is_file() and json.loads(pointer.read_text()).get("pin") == pin:
            return view
        folder, keys, transforms = self._selection(name)
        self.cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.cache))
        side = self._side_folder(name)
        for f in SIDE_FILES:
            if (side / f).is_file():
                shutil.copyfile(side / f, staging / f)
        state = side / trainer_state.NAME  # the Trainer's log: the learning rate the phase check reads
        if state.is_file() and state.stat().st_size <= trainer_state.MAX_BYTES:
            shutil.copyfile(state, staging / trainer_state.NAME)
        shutil.copyfile(self._config_file(name), staging / "config.json")
        (staging / POINTER).write_text(json.dumps({"pin": pin, "dcp": str(folder), "keys": keys,
                                                   "transforms": transforms}, indent=1))
        shutil.rmtree(view, ignore_errors=True)
        staging.rename(view)
        return view

    def weight_files(self, name: str, pin: str) -> list[str]:
        folder, keys, _ = self._selection(name)
        entries, storage = read_metadata(folder)
        used = {c.file for k in keys.values() for c in tensor_chunks(folder, k, entries[k], storage)[1]}
        return [METADATA, *sorted(used)]

    def weight_sizes(self, name: str, pin: str) -> dict[str, int]:
        folder = dcp_folder(self.path / name)
        return {f: (folder / f).stat().st_size for f in self.weight_files(name, pin)}

    def parameter_count(self, name: str, pin: str) -> tuple[int, int]:
        folder, keys, _ = self._selection(name)
        entries, storage = read_metadata(folder)
        infos = [tensor_chunks(folder, k, entries[k], storage)[0] for k in keys.values()]
        return sum(i.numel for i in infos), sum(i.nbytes for i in infos)

    def all_content_ids(self, names: list[str], pins: list[str]) -> list[dict[str, str]]:
        """Each storage file by a sampled id, and by its sha256 where two samples agree (as a plain folder)."""
        return local_content_ids([{f: dcp_folder(self.path / n) / f for f in self.weight_sizes(n, p)}
                                  for n, p in zip(names, pins)])

    def content_ids(self, name: str, pin: str) -> dict[str, str]:
        return self.all_content_ids([name], [pin])[0]

    def verify_pins(self, names: list[str], shas: list[str]) -> None:
        current = self.refs()
        changed = [n for n, s in zip(names, shas) if current.get(n) != s]
        if changed:
            raise HubError(f"The checkpoint folders {changed} of {self.id} (or --config / --key-map) changed since "
                           "the recipe was written; the recipe cannot be reproduced from them.")

    def tokenizer_fallback(self, refs: dict[str, str]) -> Path | None:
        """`--config`'s folder, else the folder root (an HF Trainer output keeps the tokenizer there)."""
        return self.config_path.parent if self.config_path else self.path

    def readiness(self, name: str, pin: str) -> str:
        return dcp_incomplete(self.path / name)

    def arrivals(self, *, settle: float = 0.0, exclude: Path | None = None,
                 cache: dict | None = None) -> list[Arrival]:
        """Every subfolder that is (or is becoming) a DCP checkpoint, ready only once its `.metadata` is whole."""
        skip = exclude.resolve() if exclude is not None else None
        subs = {p.name: p for p in self.path.iterdir() if p.is_dir() and p.resolve() != skip
                and (dcp_folder(p) is not None or p.name.startswith("checkpoint-"))}
        return [Arrival(name, why == "", why) for name in candidates(subs)
                for why in [dcp_incomplete(subs[name], settle)]]
