"""Publishing: `hf_bomerge.publish.push.push_folder` against the test Hub (write proxy in front of olah, see
tests/hubwrite.py), read back through olah with snapshot_download + from_pretrained."""

from __future__ import annotations

import base64
import json
import logging
import subprocess
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from hf_bomerge.cli import main
from hf_bomerge.errors import HubError
from hf_bomerge.publish.push import push_folder

pytestmark = pytest.mark.e2e  # every test here pushes to the test Hub

TOKEN = "hf_test_secret_token_123"


@pytest.fixture(scope="module")
def merged(trajectory, tmp_path_factory) -> Path:
    """A merged model folder as `hf-bomerge` writes it (fixed SMA merge of the last two checkpoints)."""
    tmp = tmp_path_factory.mktemp("push")
    code = main([str(trajectory), "--revisions", "last:2", "--method", "sma", "--no-eval",
                 "--output", str(tmp / "merged"), "--quiet", "--cache-dir", str(tmp / "c")])
    assert code == 0
    return tmp / "merged"


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def head(repo_id: str, branch: str = "main") -> str:
    from huggingface_hub import HfApi

    return {b.name: b.target_commit for b in HfApi().list_repo_refs(repo_id).branches}[branch]


def assert_no_token(*texts: str | bytes) -> None:
    for text in texts:
        assert (TOKEN.encode() if isinstance(text, bytes) else TOKEN) not in text


def test_push_retries_reads_back_and_is_idempotent(test_hub, merged, tmp_path, capfd, caplog):
    from huggingface_hub import snapshot_download
    from transformers import AutoModelForCausalLM

    caplog.set_level(logging.DEBUG)
    repo = "bomerge-user/merged-sma"
    test_hub.fail_next_commits(1, status=500)

    url = push_folder(merged, repo, token=TOKEN, private=True)

    commits = test_hub.writer.calls_of("commit", repo)
    assert [c.status for c in commits] == [500, 200]  # failed once, retried once
    sha = head(repo)
    assert url.endswith(f"/{repo}/commit/{sha}")
    assert len(test_hub.branch_log(repo)) == 2  # the repo's initial commit + exactly one upload
    assert test_hub.writer.private[f"model/{repo}"] is True

    folder = Path(snapshot_download(repo, revision=sha, cache_dir=tmp_path / "hf"))
    pushed = local_files(folder)
    assert pushed == local_files(merged)  # every file, byte for byte (weights came back from LFS)
    weights = [name for name in pushed if name.endswith(".safetensors")]
    for name in weights:  # stored as the Hub stores weights: an LFS pointer in git, the bytes in .git/lfs
        pointer = subprocess.run(["git", "-C", str(test_hub.repo_path(repo)), "show", f"{sha}:{name}"],
                                 capture_output=True, check=True).stdout
        assert pointer.startswith(b"version https://git-lfs.github.com/spec/v1\n")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    local = {}
    for name in weights:
        local.update(load_file(merged / name))
    params = dict(model.named_parameters())
    assert params and set(params) <= set(local)  # (the file also holds Pythia's legacy buffers)
    for name, param in params.items():
        assert torch.equal(param.detach(), local[name].float()), name

    # The same push again uploads nothing and commits nothing.
    again = push_folder(merged, repo, token=TOKEN)
    assert head(repo) == sha and again.endswith(sha)
    assert len(test_hub.writer.calls_of("commit", repo)) == 2
    assert len(test_hub.writer.calls_of("lfs-upload", repo)) == len(weights)

    # The token is nowhere: pushed files, git history, output, logs.
    git_dir = test_hub.repo_path(repo) / ".git"
    assert_no_token(*pushed.values(), *(p.read_bytes() for p in git_dir.rglob("*") if p.is_file()))
    out, err = capfd.readouterr()
    assert_no_token(out, err, caplog.text)
    assert any("retrying" in r.getMessage() for r in caplog.records if r.name == "hf_bomerge.publish.push")


def test_push_to_a_branch_with_the_env_token(test_hub, merged, monkeypatch, tmp_path):
    from huggingface_hub import snapshot_download

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    repo = "bomerge-user/merged-branch"
    url = push_folder(merged, repo, revision="bomerge-v1", commit_message="SMA of the last two")
    sha = head(repo, "bomerge-v1")
    assert url.endswith(sha) and len(test_hub.branch_log(repo)) == 1  # main keeps only its initial commit
    assert test_hub.branch_log(repo, "bomerge-v1") == [sha, test_hub.branch_log(repo)[0]]
    folder = Path(snapshot_download(repo, revision=sha, allow_patterns=["*.json"], cache_dir=tmp_path / "hf"))
    assert (folder / "config.json").read_bytes() == (merged / "config.json").read_bytes()
    # A second push to the existing branch of the existing repo: nothing new.
    push_folder(merged, repo, revision="bomerge-v1")
    assert head(repo, "bomerge-v1") == sha


def test_client_errors_are_not_retried_and_never_show_the_token(test_hub, merged):
    repo = "bomerge-user/merged-refused"
    test_hub.fail_next_commits(1, status=403)
    with pytest.raises(HubError) as info:
        push_folder(merged, repo, token=TOKEN)
    assert [c.status for c in test_hub.writer.calls_of("commit", repo)] == [403]
    message = str(info.value)
    assert "403" in message and "write access" in message and "\n" not in message
    assert_no_token(message, repr(info.value), str(info.value.__cause__))


def test_server_errors_give_up_after_max_retries(test_hub, merged, monkeypatch):
    import hf_bomerge.publish.push as publish

    monkeypatch.setattr(publish, "PUSH_RETRY_WAIT", 0.01)
    repo = "bomerge-user/merged-down"
    test_hub.fail_next_commits(3, status=503)
    with pytest.raises(HubError, match="failed 3 times.*run the same command again later"):
        push_folder(merged, repo, token=TOKEN, max_retries=2)
    assert [c.status for c in test_hub.writer.calls_of("commit", repo)] == [503] * 3
    assert len(test_hub.branch_log(repo)) == 1


def test_no_token_says_what_to_do(test_hub, merged, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(HubError, match="--token.*HF_TOKEN"):
        push_folder(merged, "bomerge-user/never", token=None)
    with pytest.raises(HubError, match="401.*token was refused"):
        push_folder(merged, "bomerge-user/never", token="not-a-valid-token")
    assert not test_hub.repo_path("bomerge-user/never").exists()


def test_server_makes_an_identical_commit_a_no_op(test_hub):
    """Below the client (which skips unchanged files itself): the commit endpoint adds no empty commit."""
    repo = "bomerge-user/noop"
    test_hub.add_model_repo(repo, {"main": {"README.md": "same\n"}})
    before = test_hub.branch_log(repo)
    lines = [{"key": "header", "value": {"summary": "again", "description": ""}},
             {"key": "file", "value": {"path": "README.md", "encoding": "base64",
                                       "content": base64.b64encode(b"same\n").decode()}}]
    r = httpx.post(f"{test_hub.endpoint}/api/models/{repo}/commit/main", headers={
        "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-ndjson"},
        content="".join(json.dumps(line) + "\n" for line in lines))
    assert r.status_code == 200 and r.json()["commitOid"] == before[0]
    assert test_hub.branch_log(repo) == before
