"""The local git source (`hf_bomerge.sources.GitSource`) on real repositories made here: pins are checked to be
commits before git sees them, and only the files a merge reads are extracted, streamed to disk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save
from testhub import make_git_repo

from hf_bomerge.errors import HubError, UnsafeFileError
from hf_bomerge.sources import GitSource

OPTIMIZER = 200 << 20  # bytes of an optimizer.pt beside the weights


def shard(seed: int) -> bytes:
    return save({f"layer{seed}.weight": np.full((64, 64), seed, dtype=np.float32)})


def checkpoint(**extra) -> dict:
    index = {"metadata": {}, "weight_map": {"layer1.weight": "model-00001-of-00002.safetensors",
                                            "layer2.weight": "model-00002-of-00002.safetensors"}}
    return {"config.json": '{"model_type": "gpt_neox"}', "tokenizer.json": "{}", "modeling_custom.py": "# code\n",
            "model.safetensors.index.json": json.dumps(index), "model-00001-of-00002.safetensors": shard(1),
            "model-00002-of-00002.safetensors": shard(2), "model-extra.safetensors": shard(3),
            "training_args.bin": b"\x80\x04not for a merge", **extra}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    path = tmp_path_factory.mktemp("git") / "run"
    evil = {"metadata": {}, "weight_map": {"a": "/etc/hostname", "b": "../outside.safetensors"}}
    shas = make_git_repo(path, {"step1": checkpoint(**{"optimizer.pt": bytes(OPTIMIZER)}),
                                "evil": checkpoint(**{"model.safetensors.index.json": json.dumps(evil)})}, lfs=False)
    return path, shas


def test_only_what_a_merge_reads_is_extracted_streamed_to_disk(repo, tmp_path):
    """The old fetch held the whole `git archive` in memory (RSS grew by more than the optimizer) and extracted it."""
    path, shas = repo
    script = ("from hf_bomerge.sources import GitSource\n"
              "def peak():  # this process's peak RSS (ru_maxrss would start at the forking parent's)\n"
              "    return int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) << 10\n"
              f"src = GitSource({str(path)!r}, {str(tmp_path)!r})\nsrc.listing('step1', {shas['step1']!r})\n"
              f"before = peak()\nprint(src.fetch('step1', {shas['step1']!r}))\nprint(peak() - before)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    folder, grown = done.stdout.split()
    assert folder == str(tmp_path / "git" / shas["step1"])
    assert int(grown) < OPTIMIZER // 8, f"peak RSS grew by {int(grown) >> 20} MB while fetching"
    assert sorted(p.name for p in Path(folder).iterdir()) == sorted(
        ["config.json", "tokenizer.json", "modeling_custom.py", "model.safetensors.index.json",
         "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    assert (Path(folder) / "model-00002-of-00002.safetensors").read_bytes() == shard(2)
    assert [p.name for p in (tmp_path / "git").iterdir()] == [shas["step1"]]  # no staging folder left
    lfs = make_git_repo(tmp_path / "lfs", {"step1": {"config.json": "{}", "model.safetensors": shard(1)}})
    with pytest.raises(HubError, match="model.safetensors on branch step1 .* git-lfs pointer.*git lfs fetch"):
        GitSource(tmp_path / "lfs", tmp_path).fetch("step1", lfs["step1"])


def test_an_index_naming_files_outside_its_revision_is_refused_before_anything_is_read(repo, tmp_path):
    path, shas = repo
    with pytest.raises(UnsafeFileError, match=r"evil.*names the weight file '(/etc/hostname|\.\./outside\.safetensors)'"
                                              r".*not a file beside the index"):
        GitSource(path, tmp_path).fetch("evil", shas["evil"])
    assert not (tmp_path / "git").exists() or not any((tmp_path / "git").iterdir())


@pytest.mark.parametrize("kind", ["option", "short", "blob", "unknown"])
def test_a_pin_that_is_not_a_commit_is_refused_and_never_reaches_git_as_an_option(repo, tmp_path, kind):
    """A recipe's or study's sha is data: `--output=FILE` made the old `git archive` create (truncate) FILE."""
    path, shas = repo
    written = tmp_path / "written"
    blob = subprocess.run(["git", "-C", str(path), "rev-parse", f"{shas['step1']}:config.json"],
                          capture_output=True, text=True, check=True).stdout.strip()
    pin = {"option": f"--output={written}", "short": shas["step1"][:12], "blob": blob, "unknown": "0" * 40}[kind]
    src = GitSource(path, tmp_path / "cache")
    for call in (lambda: src.fetch("step1", pin), lambda: src.listing("step1", pin),
                 lambda: src.config("step1", pin), lambda: src.is_local("step1", pin)):
        with pytest.raises(HubError, match=rf"The pin '{pin}' of revision 'step1' is not a commit of the git "
                                           rf"repository {path}: .*full id"):
            call()
    assert not written.exists() and not (tmp_path / "cache").exists()

