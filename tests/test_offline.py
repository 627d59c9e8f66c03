"""A fresh machine and an offline cluster: an empty HOME, cache folders that do not exist yet, and runs with
HF_HUB_OFFLINE=1 against a cache that `hf-bomerge download` filled from the test Hub.

huggingface_hub and datasets read HF_HUB_OFFLINE (and HF_HOME) at import, so every run here is a real
subprocess with its own environment; the offline ones point HF_ENDPOINT at a port nothing listens on, so
they run with no server at all.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from testhub import DATASET_CARD, free_port, pythia_branches

pytestmark = pytest.mark.e2e  # the test Hub, subprocess CLIs, real searches or training

CLI = [sys.executable, "-m", "hf_bomerge.cli"]
QUIET_NOISE = ("Traceback", "Repo card metadata", "Using the latest cached version", "WARNING:datasets")


def env_for(home: Path, *, offline: bool = False, **extra: str) -> dict:
    """A user's environment: HOME (empty at first) and an HF_HOME under it that does not exist yet."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS"))}
    env.update(HOME=str(home), HF_HOME=str(home / "hf" / "home"), **extra)
    if offline:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    return env


def cli(*args: str, env: dict, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=900)
    for noise in QUIET_NOISE:
        assert noise not in proc.stderr, proc.stderr
    return proc


@pytest.fixture(scope="module")
def fetched(test_hub, tmp_path_factory):
    """`hf-bomerge download` into an empty HOME (HF_HOME not created yet), then the offline command it printed."""
    home = tmp_path_factory.mktemp("offline") / "home"
    home.mkdir()
    proc = cli("download", test_hub.repo_id, "--revisions", "last:3", "--dataset", test_hub.dataset_id,
               "--eval-dataset", f"{test_hub.dataset_id}:prose", "--quiet", env=env_for(home))
    assert proc.returncode == 0, proc.stderr
    command = proc.stdout.strip().splitlines()[-1]
    assert command.startswith("HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 hf-bomerge ")
    return home, shlex.split(command)[3:]  # the arguments after `hf-bomerge`


def test_download_fetches_only_what_a_run_needs(fetched, test_hub):
    home, args = fetched
    steps = test_hub.step_branches[-3:]
    assert args[:3] == [test_hub.repo_id, "--revisions", ",".join(steps)]
    repo = home / "hf" / "home" / "hub" / f"models--{test_hub.repo_id.replace('/', '--')}"
    assert {p.name for p in (repo / "refs").iterdir()} == {*steps, "main"}
    assert {p.name for p in (repo / "snapshots").iterdir()} == {test_hub.shas[s] for s in [*steps, "main"]}
    for s in steps:
        files = {p.name for p in (repo / "snapshots" / test_hub.shas[s]).iterdir()}
        assert "pytorch_model.bin" in files and "config.json" in files and "tokenizer.json" in files
    main_files = {p.name for p in (repo / "snapshots" / test_hub.shas["main"]).iterdir()}
    assert "model.safetensors" not in main_files  # main's weights are not part of the run


def test_offline_search_resume_extension_show_export_recipe_and_fixed_merge(fetched, tmp_path):
    home, args = fetched
    env = env_for(home, offline=True)
    common = [*args, "--max-eval-tokens", "1024", "--quiet", "--json"]
    first = cli(*common, "--trials", "3", "--output", str(tmp_path / "a"), env=env)
    assert first.returncode == 0, first.stderr
    a = json.loads(first.stdout.splitlines()[-1])
    assert a["trials"] == 3 and a["generalization"]
    extended = cli(*common, "--trials", "4", "--output", str(tmp_path / "a"), env=env)
    assert extended.returncode == 0, extended.stderr
    b = json.loads(extended.stdout.splitlines()[-1])
    assert b["study"] == a["study"] and b["trials"] == 4 and b["shas"] == a["shas"]

    show = cli("show", "--json", env=env)
    assert show.returncode == 0, show.stderr
    assert json.loads(show.stdout.splitlines()[-1])["counts"]["complete"] == 4
    export = cli("export", "--output", str(tmp_path / "exported"), env=env)
    assert export.returncode == 0, export.stderr
    recipe = cli("--recipe", str(tmp_path / "a" / "bomerge_recipe.yaml"), "--output", str(tmp_path / "again"),
                 "--quiet", env=env)
    assert recipe.returncode == 0, recipe.stderr
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()
    assert (tmp_path / "exported" / "model.safetensors").read_bytes() == (tmp_path / "a" / "model.safetensors").read_bytes()
    assert "license: apache-2.0" in (tmp_path / "a" / "README.md").read_text()  # the card read from the cache

    fixed = cli(args[0], "--revisions", "last:2", "--method", "ema", "--no-eval", "--quiet", "--output",
                str(tmp_path / "ema"), env=env)
    assert fixed.returncode == 0, fixed.stderr
    assert (tmp_path / "ema" / "tokenizer.json").is_file()


def test_offline_lists_everything_missing_in_one_message(test_hub, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    proc = cli(test_hub.repo_id, "--revisions", "last:2", "--dataset", test_hub.dataset_id, "--eval-dataset",
               "someone/elsewhere", env=env_for(home, offline=True))
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hf-bomerge: error:")]
    assert len(errors) == 1, proc.stderr
    msg = errors[0]
    assert test_hub.repo_id in msg and f"{test_hub.dataset_id}@validation" in msg and "someone/elsewhere" in msg
    assert (f"hf-bomerge download {test_hub.repo_id} --revisions last:2 --dataset {test_hub.dataset_id}"
            in msg) and "--eval-dataset someone/elsewhere@validation" in msg


def test_offline_run_with_a_missing_weight_file_names_it(fetched, test_hub, tmp_path):
    home, args = fetched
    spare = tmp_path / "home"
    shutil.copytree(home, spare, symlinks=True)
    step = test_hub.step_branches[-1]
    snap = spare / "hf" / "home" / "hub" / f"models--{test_hub.repo_id.replace('/', '--')}" / "snapshots"
    (snap / test_hub.shas[step] / "pytorch_model.bin").unlink()
    proc = cli(*args, "--trials", "2", env=env_for(spare, offline=True))
    assert proc.returncode == 2
    assert f"{step} ({test_hub.shas[step][:12]})" in proc.stderr and "its weights" in proc.stderr
    assert "hf-bomerge download" in proc.stderr


def test_empty_home_and_cache_folders_that_do_not_exist(trajectory, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = env_for(home)
    for extra in ([], ["--cache-dir", str(tmp_path / "not" / "yet" / "cache")]):
        out = tmp_path / f"out{len(extra)}"
        proc = cli(str(trajectory), "--revisions", "last:2", "--trials", "2", "--max-eval-tokens", "512",
                   "--dataset", str(trajectory / "heldout" / "validation.jsonl"), "--quiet", "--output", str(out),
                   *extra, env=env)
        assert proc.returncode == 0, proc.stderr
        assert (out / "model.safetensors").is_file()
    assert (tmp_path / "not" / "yet" / "cache" / "studies.db").is_file()
    dry = cli(str(trajectory), "--revisions", "last:2", "--dry-run", env=env_for(tmp_path / "absent-home"))
    assert dry.returncode == 0, dry.stderr


def test_a_card_without_metadata_prints_no_library_warning(test_hub, tmp_path):
    steps = test_hub.step_branches[-2:]
    branches = pythia_branches(test_hub.trajectory, steps)
    branches["main"]["README.md"] = "# a model card without a metadata block\n"
    test_hub.add_model_repo("plain-org/no-metadata", branches)
    home = tmp_path / "home"
    home.mkdir()
    proc = cli("plain-org/no-metadata", "--revisions", "last:2", "--method", "sma", "--no-eval", "--output",
               str(tmp_path / "out"), env=env_for(home))  # progress bars on: the default a user sees
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stderr and "warn" not in proc.stderr.lower(), proc.stderr


PROBE = """
import sys
from hf_bomerge.errors import DataError
from hf_bomerge.objectives.heldout import HeldOutSpec, load_split
token = {"none": False, "user": "hf_test_user", "implicit": None}[sys.argv[1]]
try:
    if len(sys.argv) > 3:  # the API call the Space makes for a user without a token
        import hf_bomerge
        hf_bomerge.merge(sys.argv[3], "last:2", method="sma", dataset=sys.argv[2], token=token, progress=False)
    print(len(load_split(HeldOutSpec(sys.argv[2], None, "validation"), token)))
except DataError as err:
    print("DataError", err)
"""


def test_a_private_dataset_is_loaded_with_the_users_token_only(test_hub, tmp_path):
    """As in the Space: HF_TOKEN (the Space owner's) is in the environment, the user has no token."""
    repo = "owner-org/private-heldout"
    held = test_hub.trajectory / "heldout"
    test_hub.add_dataset_repo(repo, {"main": {"README.md": DATASET_CARD, "data/validation.jsonl": held / "validation.jsonl",
                                              "data/ood.jsonl": held / "ood.jsonl"}})
    test_hub.set_private(repo, "dataset")
    home = tmp_path / "home"
    home.mkdir()
    env = env_for(home, HF_TOKEN="hf_test_space_owner")
    env.pop("HF_HUB_DISABLE_IMPLICIT_TOKEN", None)
    def probe(mode, *extra, env=env):
        return subprocess.run([sys.executable, "-c", PROBE, mode, repo, *extra], capture_output=True, text=True,
                              env=env, timeout=300)

    # huggingface_hub's own lookup finds HF_TOKEN (so the test can tell), and the owner's merge caches the
    # tokenized blocks of the private set, which a user without a token must not be served either.
    implicit = probe("implicit", test_hub.repo_id)
    assert implicit.stdout.strip().isdigit(), implicit.stdout + implicit.stderr
    for without in (probe("none"), probe("none", test_hub.repo_id)):
        assert without.stdout.startswith("DataError"), without.stdout + without.stderr
        assert repo in without.stdout
    with_user = probe("user", env=env_for(tmp_path / "home2"))
    assert with_user.stdout.strip().isdigit(), with_user.stdout + with_user.stderr


def test_ci_runs_the_readmes_test_command_in_a_fresh_environment_with_an_empty_home():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    command = next(line.split("#")[0].strip() for line in readme.splitlines() if "python -m pytest" in line)
    ci = (root / ".ci" / "run").read_text().splitlines()
    assert command in ci  # the same line, verbatim
    assert any(line.startswith("python3 -m venv ") for line in ci)
    assert any(line.startswith('export HOME="$work/home"') for line in ci)
    assert ci.index(command) > max(i for i, line in enumerate(ci) if "export HOME" in line)
