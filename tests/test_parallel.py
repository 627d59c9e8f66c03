"""Data-parallel evaluation under `accelerate launch` (real processes, gloo on the CPU), against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# torchrun's launcher: `accelerate launch --cpu --num_processes 2` starts ONE process unless mpirun is set up, so
# two real processes on a machine without GPUs come from --multi_gpu (hf_bomerge.objectives.parallel then picks gloo)
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def _run(launcher: list[str], source: Path, trajectory: Path, tmp: Path, name: str) -> subprocess.CompletedProcess:
    args = [str(source), "--revisions", "last:3", "--dataset", str(trajectory / "heldout" / "validation.jsonl"),
            "--eval-dataset", str(trajectory / "heldout" / "ood.jsonl"), "--trials", "6", "--study-name", name,
            "--output", str(tmp / name), "--quiet", "--json", "--cache-dir", str(tmp / "cache")]
    proc = subprocess.run([*launcher, "-m", "hf_bomerge.cli", *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.e2e
def test_accelerate_launch_two_processes_gives_the_loss_of_one(source, trajectory, tmp_path):
    two = _run(ACCELERATE, source, trajectory, tmp_path, "two")
    one = _run([sys.executable], source, trajectory, tmp_path, "one")
    lines = [line for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # only the main process reports
    a, b = json.loads(lines[0]), json.loads(one.stdout.strip().splitlines()[-1])
    assert a["baselines"].keys() == b["baselines"].keys()
    for k in a["baselines"]:  # each process scored half the batches; the reduced sums give the same mean
        assert a["baselines"][k] == pytest.approx(b["baselines"][k], rel=1e-9, abs=0)
    assert a["generalization"]["ood.jsonl"]["uniform"] == pytest.approx(b["generalization"]["ood.jsonl"]["uniform"],
                                                                        rel=1e-9, abs=0)
    assert a["trials"] == 6 and (tmp_path / "two" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("two")) == ["two"]  # one output


@pytest.mark.e2e
@pytest.mark.parametrize("fail_rank, reduce", [(0, True), (1, True), (1, False)],
                         ids=["main-before-reduce", "other-before-reduce", "other-no-reduce"])
def test_an_objective_that_raises_on_one_process_stops_every_process_with_its_error(fail_rank, reduce, tmp_path):
    """Two real processes (gloo): an evaluation that raises on one of them, before the loss reduction or in an
    objective with none, ends the run with that error on every process, never a hang in mismatched collectives."""
    env = {**os.environ, "FAIL_RANK": str(fail_rank), "REDUCE": "1" if reduce else "0",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    script = Path(__file__).parent / "assets" / "failing_rank.py"
    proc = subprocess.run([*ACCELERATE, str(script)], capture_output=True, text=True, env=env, timeout=180,
                          cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"[rank{fail_rank}]: RuntimeError: objective failed on rank {fail_rank}" in out
    assert f"[rank{1 - fail_rank}]: hf_bomerge.objectives.parallel.PeerError" in out


def test_shards_of_the_batches_sum_to_the_whole(trajectory):
    from transformers import AutoModelForCausalLM

    from hf_bomerge.objectives.heldout import nll_sums

    model = AutoModelForCausalLM.from_pretrained(trajectory / "main", dtype=torch.float32)
    blocks = torch.randint(0, model.config.vocab_size, (7, 64), generator=torch.Generator().manual_seed(0))
    whole = nll_sums(model, blocks, batch_size=2)
    parts = [nll_sums(model, blocks, 2, rank, 3) for rank in range(3)]
    assert sum(c for _, c in parts) == whole[1] == 7 * 63
    assert sum(t for t, _ in parts) == pytest.approx(whole[0], rel=1e-12)


@pytest.mark.e2e
def test_device_map_auto_places_the_model_with_accelerate_and_scores_the_same(source, trajectory, tmp_path, capsys):
    """On this CPU-only machine Accelerate's map puts everything on the CPU; the multi-GPU split itself needs
    GPUs (not available to CI): the merger keeps each parameter's checkpoints on that parameter's device."""
    from hf_bomerge.cli import main

    args = [str(source), "--revisions", "last:3", "--method", "ema", "--dataset",
            str(trajectory / "heldout" / "validation.jsonl"), "--quiet", "--json", "--cache-dir", str(tmp_path / "c")]
    assert main([*args, "--output", str(tmp_path / "plain")]) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*args, "--output", str(tmp_path / "mapped"), "--device-map", "auto"]) == 0
    mapped = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert mapped["loss"] == plain["loss"]
