"""Session fixtures: the demo trajectory and an offline test Hub (olah on 127.0.0.1).

The Hugging Face environment is set here, at import time, before any test module imports
huggingface_hub, datasets or transformers (they read it at import): HF_ENDPOINT points at a loopback
port where the `test_hub` fixture starts the test Hub (a write proxy in front of olah), so no test can
reach the real Hub; HF_HOME is a fresh folder for this session (no user token, no user cache).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from testhub import TestHub, free_port

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="hf-bomerge-tests-"))
atexit.register(shutil.rmtree, _SESSION_DIR, ignore_errors=True)
_HUB_PORT = free_port()

for _var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
             "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE",
             "HF_XET_CACHE", "HF_ASSETS_CACHE", "HF_TOKEN_PATH", "HF_STORED_TOKENS_PATH"):
    os.environ.pop(_var, None)
os.environ.update({
    "HF_HOME": str(_SESSION_DIR / "hf_home"),
    "HF_ENDPOINT": f"http://127.0.0.1:{_HUB_PORT}",
    "HF_HUB_DISABLE_XET": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "DO_NOT_TRACK": "1",
})


def _check_hub_constants() -> None:
    """huggingface_hub reads its environment once, at import: make sure it read ours."""
    from huggingface_hub import constants

    want = {"ENDPOINT": os.environ["HF_ENDPOINT"], "HF_HOME": os.environ["HF_HOME"]}
    got = {"ENDPOINT": constants.ENDPOINT, "HF_HOME": constants.HF_HOME}
    if got != want or not constants.HF_HUB_DISABLE_XET:
        pytest.fail(f"huggingface_hub was imported before tests/conftest.py set its environment: {got}")


@pytest.fixture(scope="session")
def trajectory() -> Path:
    """The demo checkpoint trajectory (hf_bomerge.demo), built once and cached across sessions."""
    from hf_bomerge.demo import build_trajectory

    return build_trajectory(quiet=True)


@pytest.fixture()
def source(trajectory: Path, tmp_path: Path) -> Path:
    """The demo run's last 3 revisions as a local folder of checkpoints (a copy: a test may change it)."""
    steps = json.loads((trajectory / "trajectory.json").read_text())["revisions"][-3:]
    for s in steps:
        shutil.copytree(trajectory / s, tmp_path / "ckpts" / s)
    return tmp_path / "ckpts"


@pytest.fixture(scope="session")
def test_hub(trajectory: Path):
    """olah serving, offline on 127.0.0.1, a Pythia-like model repo (``test_hub.repo_id``, branches
    ``main`` + ``test_hub.step_branches``) and a held-out dataset repo (``test_hub.dataset_id``).
    More repos: ``test_hub.add_model_repo(repo_id, {branch: {relpath: path_or_content}})``. Pushes (token
    ``hf_test…``) commit into the same mirrors; ``test_hub.fail_next_commits(n, status)`` injects faults,
    ``test_hub.writer.calls_of(kind, repo_id)`` lists the write calls, ``test_hub.branch_log`` the commits."""
    _check_hub_constants()
    hub = TestHub(root=_SESSION_DIR / "hub", port=_HUB_PORT)
    hub.hf_home = Path(os.environ["HF_HOME"])
    hub.add_pythia_repos(trajectory)
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server on 127.0.0.1 (tests/pgserver.py); its SQLAlchemy URL, database `bomerge`."""
    from pgserver import PostgresServer

    server = PostgresServer()
    try:
        yield server.url
    finally:
        server.stop()
