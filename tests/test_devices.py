"""What a GPU run holds and in which dtype it reports, checked on the CPU: the plan counts the re-score in the
saved dtype and each device's share (model, its N checkpoints, activations), and every reported number comes
from one dtype. Where only a GPU answers (free memory, bfloat16 support), the test says what it stands in for."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from hf_bomerge import api
from hf_bomerge.cli import main
from hf_bomerge.plan import PlanError


def _plan(source: Path, **kwargs):
    return api.plan(str(source), "last:3", cache_dir=source.parent / "cache", **kwargs)


def test_the_plan_counts_the_rescore_in_the_saved_dtype_and_streams_or_refuses_it(source):
    """A search in bfloat16 of a merge saved in float32 (as on a GPU with float32 checkpoints) reloads the model
    in float32 with its checkpoints after the search: the plan streams that re-score when only the model fits,
    and refuses before any download when even the float32 model does not."""
    full = _plan(source, device="cpu", eval_dtype="bfloat16", store_dtype="float32")
    assert full.rescore_model_bytes == 2 * full.model_bytes and full.rescore_mode == "resident"
    search_fits = full.resident_bytes  # the search, resident; the re-score would need 2 bytes more per parameter
    plan = _plan(source, device="cpu", eval_dtype="bfloat16", store_dtype="float32", max_memory=search_fits)
    assert plan.mode == "resident" and plan.rescore_mode == "streamed"
    plan.check()
    assert "re-score" in plan.describe() and "streamed mode" in plan.describe()
    only_the_search = full.rescore_model_bytes + full.activation_bytes - 1
    plan = _plan(source, device="cpu", eval_dtype="bfloat16", store_dtype="float32", max_memory=only_the_search)
    assert plan.mode == "streamed" and plan.rescore_mode == "none"
    with pytest.raises(PlanError, match="--dtype bfloat16"):
        plan.check()
    same = _plan(source, device="cpu", eval_dtype="bfloat16", store_dtype="bfloat16", max_memory=only_the_search)
    assert same.rescore_mode is None  # saved as evaluated: nothing is re-scored
    same.check()


def test_device_map_counts_each_device_its_share_of_the_model_checkpoints_and_activations(source, monkeypatch):
    """Two GPUs stand in for real ones: `torch.cuda.is_available`, `device_count` and `mem_get_info` are mocked
    (only those calls; nothing is placed). Accelerate's real placement over GPUs is not exercised here."""
    full = _plan(source, device="cpu", eval_dtype="bfloat16", batch_size=1)
    per_device = (full.resident_bytes + full.activation_bytes // 2) // 2  # two of them hold it all, summed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (per_device, 2 * per_device))
    plan = _plan(source, eval_dtype="bfloat16", batch_size=1, device_map="sequential")
    # summed, they hold the model, its checkpoints and ONE batch; each device needs its own batch's room
    assert plan.resident_bytes <= 2 * per_device and plan.mode == "streamed"
    assert plan.devices == {"cuda:0": per_device, "cuda:1": per_device}
    capped = _plan(source, eval_dtype="bfloat16", batch_size=1, device_map="auto", max_memory=2 * per_device)  # per device
    assert capped.memory_available == 4 * per_device and capped.mode == "resident"
    share = capped.model_memory(capped.model_bytes, "resident")  # what Accelerate may place on each device
    assert sum(share.values()) >= capped.model_bytes
    for device, model_part in share.items():  # that part, its N checkpoints beside it, and one batch fit there
        checkpoints = model_part * capped.resident_checkpoint_bytes / capped.model_bytes
        assert model_part + checkpoints + capped.activation_bytes <= capped.devices[device]
    streamed = capped.model_memory(capped.model_bytes, "streamed")
    assert all(v == 2 * per_device - capped.activation_bytes for v in streamed.values())


@pytest.fixture()
def float32_source(trajectory: Path, tmp_path: Path) -> Path:
    from transformers import AutoModelForCausalLM

    for s in json.loads((trajectory / "trajectory.json").read_text())["revisions"][-2:]:
        model = AutoModelForCausalLM.from_pretrained(trajectory / s, dtype=torch.float32)
        model.save_pretrained(tmp_path / "f32" / s)
    return tmp_path / "f32"


def test_a_gpu_without_bfloat16_evaluates_in_float32_and_says_so(float32_source, monkeypatch, caplog):
    """`torch.cuda.is_available` and `is_bf16_supported` are mocked (a GPU before Ampere); nothing runs on it."""
    from hf_bomerge.objectives.evaluator import choose_eval_dtype
    from hf_bomerge.reading.checkpoints import CheckpointSet

    folders = sorted(float32_source.iterdir())
    ckpts = CheckpointSet(folders, [f.name for f in folders])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert choose_eval_dtype(None, "cuda", ckpts) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    with caplog.at_level(logging.WARNING, logger="hf_bomerge"):
        assert choose_eval_dtype(None, "cuda", ckpts) == torch.float32
    assert "bfloat16" in caplog.text and "float32" in caplog.text
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10**12, 10**12))
    plan = api.plan(str(float32_source), "last:2", cache_dir=float32_source.parent / "cache", device="cuda")
    assert plan.model_bytes == 4 * plan.params  # the plan counts the float32 model it will load


@pytest.mark.e2e
def test_the_rescore_streamed_gives_the_numbers_of_the_resident_one(source, trajectory, tmp_path, capsys, caplog):
    """bfloat16 evaluation, float32 merge (`--dtype float32`): the loss is scored again in float32; with a budget
    that holds the search but not the float32 re-score beside the checkpoints, that re-score streams, bit for bit
    the same; with less than the float32 model, the run is refused before anything is loaded."""
    args = [str(source), "--revisions", "last:3", "--method", "wma", "--eval-dtype", "bfloat16", "--dtype", "float32",
            "--dataset", str(trajectory / "heldout" / "validation.jsonl"), "--quiet", "--json",
            "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["rescore_mode"] == "resident" and plan["rescore_bytes"] > plan["resident_bytes"]
    assert main([*args, "--output", str(tmp_path / "resident")]) == 0
    resident = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*args, "--output", str(tmp_path / "streamed"), "--max-memory", str(plan["resident_bytes"])]) == 0
    streamed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "streamed mode after the search" in caplog.text
    assert streamed["loss"] == resident["loss"]
    short = str(plan["rescore_bytes"] - plan["resident_bytes"] + plan["streamed_bytes"] - 1)
    assert main([*args, "--output", str(tmp_path / "refused"), "--max-memory", short]) == 2
    assert "saved in" in capsys.readouterr().err and not (tmp_path / "refused").exists()


@pytest.mark.e2e
def test_a_warm_start_seed_is_reported_in_the_saved_dtype_like_every_baseline(source, trajectory, tmp_path):
    """`watch` seeds each round with the previous best (`extra_seeds`); searched in bfloat16, the fp16 merge's
    numbers are scored again in float16, that seed's row too: it equals a fixed merge of the same weights."""
    warm = [0.2, 0.3, 0.5]
    common = dict(dataset=str(trajectory / "heldout" / "validation.jsonl"), eval_dtype="bfloat16",
                  cache_dir=tmp_path / "cache", progress=False)
    result = api.search(str(source), "last:3", trials=7, extra_seeds=[("previous round", warm)], confirm_fraction=0.0,
                        storage=f"sqlite:///{tmp_path / 's.db'}", **common)
    assert result.eval_dtype == "float16"  # the dtype the reported numbers were computed in
    fixed = api.merge(str(source), "last:3", weights=warm, **common)
    assert result.baselines["previous round"] == fixed.loss
    uniform = next(t.weights for t in result.trace if t.seed == "uniform")
    assert result.baselines["uniform"] == api.merge(str(source), "last:3", weights=uniform, **common).loss
