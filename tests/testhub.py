"""An offline Hugging Face Hub for the tests: git repositories served by olah on 127.0.0.1.

`make_git_repo` writes a Hub-like git repository (one commit per branch, large files as git-LFS pointers
with their objects in ``.git/lfs/objects``, where olah 0.5.4 reads them) under olah's ``mirrors-path``;
`TestHub` runs olah in offline mirror mode over that folder. Repositories added while olah runs are
served at once: olah reads the git repositories on every request. olah listens on a port of its own;
``TestHub.endpoint`` (the port ``HF_ENDPOINT`` names) is the write proxy of tests/hubwrite.py, which answers
create_repo / create_branch / upload_folder by committing into the same mirrors and forwards the rest to olah.

What olah 0.5.4 serves from such a mirror (checked by tests/test_testhub.py): ``list_repo_refs``,
``model_info``/``dataset_info`` with an explicit ``revision``, ``hf_hub_download``, ``snapshot_download``,
``list_repo_files``/``list_repo_tree`` with a revision, ``datasets.load_dataset``. Not served:
``model_info`` without a revision, and a missing file answers 401, not 404.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

Source = Path | str | bytes  # a file to copy (Path), or the content itself (str/bytes)

# Suffixes the Hub's default .gitattributes sends to LFS; files above 10 MB go there too.
LFS_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf",
                ".npy", ".npz", ".parquet", ".arrow", ".zip", ".tar", ".gz", ".model")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)
_GIT_ENV = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_TERMINAL_PROMPT": "0"}


def _content(source: Source) -> bytes:
    if isinstance(source, bytes):
        return source
    if isinstance(source, str):
        return source.encode()
    return Path(source).read_bytes()


def _git(repo: Path, *args: str, input: bytes | None = None) -> str:
    env = {**os.environ, **_GIT_ENV}
    done = subprocess.run(["git", "-C", str(repo), *args], input=input, env=env, capture_output=True)
    if done.returncode:
        raise RuntimeError(f"git {' '.join(args)} failed: {done.stderr.decode(errors='replace')}")
    return done.stdout.decode()


def is_lfs_file(rel: str, size: int) -> bool:
    """Whether the Hub stores ``rel`` (of ``size`` bytes) with git-LFS."""
    return rel.endswith(LFS_SUFFIXES) or size > LFS_MIN_SIZE


def lfs_object_path(repo: Path, oid: str) -> Path:
    """Where olah 0.5.4 reads the bytes of LFS object ``oid`` (sha256 hex) of non-bare repo ``repo``."""
    return Path(repo) / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid


def lfs_pointer(repo: Path, data: bytes) -> bytes:
    """Store ``data`` as an LFS object of ``repo``; returns the pointer file that goes into git."""
    oid = hashlib.sha256(data).hexdigest()
    obj = lfs_object_path(repo, oid)
    if not obj.exists():
        obj.parent.mkdir(parents=True, exist_ok=True)
        obj.write_bytes(data)
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n".encode()


def make_git_repo(path: Path, branches: Mapping[str, Mapping[str, Source]], *,
                  message: str = "Upload checkpoint", lfs: bool = True) -> dict[str, str]:
    """Create (or update) a non-bare git repository at ``path`` laid out as the Hub stores one.

    ``branches`` maps a branch name to ``{relative path: source}``; each branch gets one commit whose
    tree is exactly those files plus a ``.gitattributes`` (an existing branch gets a new commit on top).
    Files with an LFS suffix (or over 10 MB) are stored as LFS pointers with their bytes in
    ``.git/lfs/objects/<oid[:2]>/<oid[2:4]>/<oid>``. Returns ``{branch: commit sha}``.
    """
    path = Path(path)
    if not (path / ".git").is_dir():
        path.mkdir(parents=True, exist_ok=True)
        _git(path, "init", "-q", "-b", "main")
    existing = set(_git(path, "for-each-ref", "--format=%(refname:short)", "refs/heads/").split())
    stream, marks = bytearray(), {}

    def blob(data: bytes) -> int:
        key = hashlib.sha256(data).digest()
        if key not in marks:
            marks[key] = len(marks) + 1
            stream.extend(b"blob\nmark :%d\ndata %d\n" % (marks[key], len(data)) + data + b"\n")
        return marks[key]

    when = int(time.time()) if existing else 1_700_000_000
    for i, (branch, files) in enumerate(branches.items()):
        entries = {".gitattributes": blob(GITATTRIBUTES.encode())} if lfs else {}
        for rel, source in files.items():
            data = _content(source)
            if lfs and is_lfs_file(rel, len(data)):
                data = lfs_pointer(path, data)
            entries[rel] = blob(data)
        msg = f"{message} ({branch})".encode()
        stream.extend(f"commit refs/heads/{branch}\n"
                      f"committer Test Hub <hub@example.invalid> {when + 60 * i} +0000\n".encode()
                      + b"data %d\n" % len(msg) + msg + b"\n")
        if branch in existing:
            stream.extend(f"from refs/heads/{branch}^0\ndeleteall\n".encode())
        for rel, mark in sorted(entries.items()):
            stream.extend(f"M 100644 :{mark} {rel}\n".encode())
        stream.extend(b"\n")
    _git(path, "fast-import", "--quiet", "--force", input=bytes(stream))
    return {b: _git(path, "rev-parse", f"refs/heads/{b}").strip() for b in branches}


PYTHIA_REPO = "EleutherAI-test/pythia-tiny"
DATASET_REPO = "bomerge-test/heldout"
MODEL_CARD = """---
license: apache-2.0
library_name: transformers
tags: [pytorch, gpt_neox, causal-lm]
---
# pythia-tiny (test fixture)

A tiny GPT-NeoX trained by `hf_bomerge.demo` on CPython's standard library; one branch per checkpoint.
"""
DATASET_CARD = """---
configs:
- config_name: default
  default: true
  data_files:
  - split: validation
    path: data/validation.jsonl
  - split: ood
    path: data/ood.jsonl
- config_name: prose
  data_files:
  - split: validation
    path: data/ood.jsonl
---
# heldout (test fixture)

`validation`: stdlib packages never trained on (code). `ood` (or config `prose`): English prose.
"""


def pythia_branches(trajectory: Path, steps: list[str]) -> dict[str, dict[str, Path | str]]:
    """Branches as EleutherAI's Pythia repos hold them: stepN with only pytorch_model.bin (fp16, legacy
    buffers) + config + tokenizer; main with model.safetensors + config + tokenizer + README.md."""
    def files(folder: Path, weights: str) -> dict[str, Path | str]:
        out = {p.name: p for p in sorted(folder.iterdir())
               if p.is_file() and p.suffix in (".json", ".txt", ".model")}
        out[weights] = folder / weights
        return out

    branches = {s: files(trajectory / s, "pytorch_model.bin") for s in steps}
    branches["main"] = {**files(trajectory / "main", "model.safetensors"), "README.md": MODEL_CARD}
    return branches


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TestHub:
    """olah serving git repositories from ``mirrors``, behind the write proxy of tests/hubwrite.py at
    ``endpoint`` (``port``, the one ``HF_ENDPOINT`` names); olah itself listens on ``olah_port``
    (a free port when 0). Pushes through ``endpoint`` commit into the same mirrors; ``writer`` is the
    `hubwrite.HubWriter` (call records, ``fail_next``); ``fail_next_commits(n, status)`` injects faults."""

    __test__ = False  # not a test class, despite the name

    root: Path
    port: int
    olah_port: int = 0
    mirrors: Path = field(init=False)
    endpoint: str = field(init=False)
    process: subprocess.Popen | None = field(default=None, init=False)
    writer: object | None = field(default=None, init=False)  # hubwrite.HubWriter once started
    # Filled by `add_pythia_repos`: the Pythia-like model repo and the held-out dataset repo.
    repo_id: str | None = None
    dataset_id: str | None = None
    step_branches: list[str] = field(default_factory=list)
    shas: dict[str, str] = field(default_factory=dict)
    dataset_sha: str | None = None
    trajectory: Path | None = None
    hf_home: Path | None = None

    @property
    def org(self) -> str | None:
        return self.repo_id.split("/")[0] if self.repo_id else None

    @property
    def name(self) -> str | None:
        return self.repo_id.split("/")[1] if self.repo_id else None

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.mirrors = self.root / "mirrors"
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def repo_path(self, repo_id: str, repo_type: str = "model") -> Path:
        """The git repository behind ``repo_id`` (``ORG/NAME``) in the mirror."""
        return self.mirrors / f"{repo_type}s" / repo_id

    def fail_next_commits(self, n: int = 1, status: int = 500) -> None:
        """The next ``n`` commit calls (``upload_folder``/``create_commit``) answer ``status``, committing nothing."""
        self.writer.fail_next_commits(n, status)

    def branch_log(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> list[str]:
        """The commit shas of ``branch`` in the mirror, newest first."""
        return _git(self.repo_path(repo_id, repo_type), "rev-list", f"refs/heads/{branch}").split()

    def add_model_repo(self, repo_id: str, branches: Mapping[str, Mapping[str, Source]], **kw) -> dict[str, str]:
        """Create or update model repo ``repo_id`` with ``{branch: {relpath: source}}``; returns branch shas."""
        return make_git_repo(self.repo_path(repo_id, "model"), branches, **kw)

    def set_private(self, repo_id: str, repo_type: str = "model") -> None:
        """Make ``repo_id`` private: served only to requests with an ``hf_test…`` token."""
        self.writer.set_private(repo_id, repo_type)

    def add_dataset_repo(self, repo_id: str, branches: Mapping[str, Mapping[str, Source]], **kw) -> dict[str, str]:
        """Create or update dataset repo ``repo_id`` (see `add_model_repo`)."""
        return make_git_repo(self.repo_path(repo_id, "dataset"), branches, **kw)

    def add_pythia_repos(self, trajectory: Path, repo_id: str = PYTHIA_REPO,
                         dataset_id: str = DATASET_REPO) -> None:
        """Publish a `hf_bomerge.demo` trajectory as a Pythia-like model repo plus a held-out dataset repo."""
        self.trajectory = Path(trajectory)
        steps = json.loads((self.trajectory / "trajectory.json").read_text())["revisions"]
        self.shas = self.add_model_repo(repo_id, pythia_branches(self.trajectory, steps))
        self.repo_id, self.step_branches = repo_id, list(steps)
        held = self.trajectory / "heldout"
        self.dataset_sha = self.add_dataset_repo(dataset_id, {"main": {
            "README.md": DATASET_CARD, "data/validation.jsonl": held / "validation.jsonl",
            "data/ood.jsonl": held / "ood.jsonl"}})["main"]
        self.dataset_id = dataset_id

    def start(self, timeout: float = 60.0) -> None:
        """Start olah and the write proxy in front of it; never reaches beyond 127.0.0.1."""
        self.olah_port = self.olah_port or free_port()
        self.mirrors.mkdir(parents=True, exist_ok=True)
        probe = "probe-org/probe"
        self.add_model_repo(probe, {"main": {"README.md": "probe\n"}})
        # A port bound but never listening refuses connections: olah's upstream calls fail at once.
        self._dead = socket.socket()
        self._dead.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{self._dead.getsockname()[1]}"
        config = self.root / "olah.toml"
        config.write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\nport = {self.olah_port}\n'
            f'repos-path = "{self.root / "olah-cache"}"\n'
            f'mirrors-path = ["{self.mirrors}"]\n'
            f'hf-scheme = "http"\nhf-netloc = "{dead}"\nhf-lfs-netloc = "{dead}"\n'
            f'mirror-scheme = "http"\nmirror-netloc = "127.0.0.1:{self.port}"\n'
            f'mirror-lfs-netloc = "127.0.0.1:{self.port}"\n'
            "metadata-cache-ttl = 0\n"
            "[accessibility]\noffline = true\n"
        )
        self.log = self.root / "olah.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "olah.server", "--config", str(config), "--log-path", str(self.root / "logs")],
                cwd=self.root, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={k: v for k, v in os.environ.items() if not k.endswith(("_proxy", "_PROXY"))},
            )
        url = f"http://127.0.0.1:{self.olah_port}/api/models/{probe}/refs"
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"olah did not start on port {self.olah_port}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        shutil.rmtree(self.repo_path(probe), ignore_errors=True)
        from hubwrite import HubWriter  # the write endpoints, and the proxy to olah for everything else

        self.writer = HubWriter(self.repo_path, f"http://127.0.0.1:{self.olah_port}", self.port)
        try:
            self.writer.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the write proxy and olah (only what this object started)."""
        if self.writer is not None:
            self.writer.stop()
            self.writer = None
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if getattr(self, "_dead", None) is not None:
            self._dead.close()
            self._dead = None
