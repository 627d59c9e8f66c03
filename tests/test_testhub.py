"""The offline test Hub and the demo trajectory work with the real huggingface_hub/datasets clients."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch


def test_demo_trajectory_is_cached(trajectory: Path):
    from hf_bomerge.demo import build_trajectory

    start = time.perf_counter()
    again = build_trajectory(quiet=True)
    assert again == trajectory
    assert time.perf_counter() - start < 1.0
    meta = json.loads((trajectory / "trajectory.json").read_text())
    assert meta["revisions"] == sorted(meta["revisions"], key=lambda r: int(r[4:]))
    assert len(meta["revisions"]) >= 6
    for rev in meta["revisions"]:
        assert (trajectory / rev / "pytorch_model.bin").is_file()
        assert not (trajectory / rev / "model.safetensors").exists()
    assert (trajectory / "main" / "model.safetensors").is_file()
    for name in ("validation.jsonl", "ood.jsonl", "validation.txt"):
        assert (trajectory / "heldout" / name).stat().st_size > 10_000
    assert not list(trajectory.parent.glob(f".{trajectory.name}.*"))  # no temporary build folder left


def test_demo_checkpoints_look_like_pythia(trajectory: Path):
    meta = json.loads((trajectory / "trajectory.json").read_text())
    first, last = meta["revisions"][0], meta["revisions"][-1]
    sd = torch.load(trajectory / first / "pytorch_model.bin", weights_only=True, mmap=True)
    layers = meta["params"]["num_hidden_layers"]
    n = meta["params"]["max_position_embeddings"]
    for i in range(layers):
        p = f"gpt_neox.layers.{i}.attention."
        assert sd[p + "bias"].dtype == torch.bool and sd[p + "bias"].shape == (1, 1, n, n)
        assert torch.equal(sd[p + "bias"][0, 0], torch.tril(torch.ones(n, n, dtype=torch.bool)))
        assert sd[p + "masked_bias"].dtype == torch.float16 and sd[p + "masked_bias"].item() == -math.inf
        assert sd[p + "rotary_emb.inv_freq"].is_floating_point()
        assert sd[p + "query_key_value.weight"].dtype == torch.float16
    assert sd["lm_head.weight"].data_ptr() != sd["gpt_neox.embed_in.weight"].data_ptr()  # untied, like Pythia

    from safetensors.torch import load_file

    main = load_file(trajectory / "main" / "model.safetensors")
    final = torch.load(trajectory / last / "pytorch_model.bin", weights_only=True)
    assert set(main) < set(final)
    assert all(torch.equal(main[k], final[k]) for k in main)  # main is the last step


def test_demo_loads_with_transformers(trajectory: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rev = json.loads((trajectory / "trajectory.json").read_text())["revisions"][-1]
    tok = AutoTokenizer.from_pretrained(trajectory / rev)
    model = AutoModelForCausalLM.from_pretrained(trajectory / rev, dtype=torch.float32)
    text = json.loads((trajectory / "heldout" / "validation.jsonl").open().readline())["text"]
    ids = torch.tensor([tok(text).input_ids[:128]])
    assert tok.eos_token == "<|endoftext|>" and tok.decode(ids[0]) == text[: len(tok.decode(ids[0]))]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < math.log(model.config.vocab_size) - 1  # it learned something


@pytest.mark.e2e
def test_refs_list_the_step_branches(test_hub):
    from huggingface_hub import HfApi

    refs = HfApi().list_repo_refs(test_hub.repo_id)
    branches = {b.name: b.target_commit for b in refs.branches}
    assert set(branches) == {"main", *test_hub.step_branches}
    assert branches == test_hub.shas
    assert HfApi().model_info(test_hub.repo_id, revision=test_hub.step_branches[0]).sha == \
        test_hub.shas[test_hub.step_branches[0]]


@pytest.mark.e2e
def test_snapshot_download_returns_the_step_bytes(test_hub):
    from huggingface_hub import snapshot_download

    step = test_hub.step_branches[-2]
    folder = Path(snapshot_download(test_hub.repo_id, revision=step, allow_patterns=["*.bin", "*.json"]))
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "generation_config.json", "pytorch_model.bin", "tokenizer.json", "tokenizer_config.json"]
    got = (folder / "pytorch_model.bin").read_bytes()
    assert got == (test_hub.trajectory / step / "pytorch_model.bin").read_bytes()  # LFS served as real bytes
    assert folder.name == test_hub.shas[step]
    assert str(folder).startswith(str(test_hub.hf_home))


@pytest.mark.e2e
def test_hf_hub_download_main_safetensors(test_hub):
    from huggingface_hub import HfApi, hf_hub_download

    path = hf_hub_download(test_hub.repo_id, "model.safetensors")
    assert Path(path).read_bytes() == (test_hub.trajectory / "main" / "model.safetensors").read_bytes()
    files = HfApi().list_repo_files(test_hub.repo_id, revision="main")
    assert "model.safetensors" in files and "pytorch_model.bin" not in files


@pytest.mark.e2e
def test_missing_file_at_a_pinned_sha_is_entry_not_found(test_hub):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    with pytest.raises(EntryNotFoundError):
        hf_hub_download(test_hub.repo_id, "model.safetensors", revision=test_hub.shas[test_hub.step_branches[0]])


@pytest.mark.e2e
def test_load_dataset_through_the_hub(test_hub):
    import datasets

    ds = datasets.load_dataset(test_hub.dataset_id, split="validation")
    assert "text" in ds.column_names and len(ds) > 10
    lines = (test_hub.trajectory / "heldout" / "validation.jsonl").read_text().splitlines()
    assert ds[0]["text"] == json.loads(lines[0])["text"]
    ood = datasets.load_dataset(test_hub.dataset_id, "prose", split="validation")
    assert ood[0]["text"] != ds[0]["text"]


@pytest.mark.e2e
def test_extra_repos_with_other_branch_names(test_hub, tmp_path: Path):
    from huggingface_hub import HfApi, hf_hub_download

    names = ["stage1-step1000-tokens4B", "stage1-step2000-tokens8B", "train_00220B"]
    weights = {n: f"weights of {n}".encode() for n in names}
    shas = test_hub.add_model_repo("olmo-test/tiny", {n: {"model.safetensors": weights[n],
                                                         "config.json": "{}"} for n in names})
    refs = HfApi().list_repo_refs("olmo-test/tiny")
    assert {b.name: b.target_commit for b in refs.branches} == shas
    path = hf_hub_download("olmo-test/tiny", "model.safetensors", revision=shas[names[1]])
    assert Path(path).read_bytes() == weights[names[1]]
    # Updating a branch adds a commit on top of it; olah serves the new state at once.
    new = test_hub.add_model_repo("olmo-test/tiny", {names[1]: {"model.safetensors": b"changed"}})
    assert new[names[1]] != shas[names[1]]
    path = hf_hub_download("olmo-test/tiny", "model.safetensors", revision=new[names[1]])
    assert Path(path).read_bytes() == b"changed"
