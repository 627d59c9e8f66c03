"""The early-training warning (hf_bomerge.reading.phase) through the product path, on the demo trajectory.

The demo's checkpoints start at step 250, already past the phase where merging hurts (the uniform average of
step250..step400 beats step400 by about 0.1 nats there), so the early window reaches back to an
initialization of the demo's model: its step0, stored like the demo's Pythia-style checkpoints.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

import hf_bomerge
from hf_bomerge import demo
from hf_bomerge.reading import phase
from hf_bomerge.reading.checkpoints import CheckpointSet

WARNING = "reaches into early training"


@pytest.fixture(scope="module")
def run_with_init(trajectory: Path, tmp_path_factory) -> Path:
    """A folder source: a fresh step0 of the demo's model (seed 0, fp16 .bin with legacy buffers) + step250..400."""
    from transformers import AutoConfig, GPTNeoXForCausalLM

    root = tmp_path_factory.mktemp("early-run")
    for name in ("step250", "step300", "step350", "step400"):
        shutil.copytree(trajectory / name, root / name)
    step0 = root / "step0"
    shutil.copytree(trajectory / "step250", step0, ignore=shutil.ignore_patterns("pytorch_model.bin"))
    with torch.random.fork_rng():
        torch.manual_seed(demo.PARAMS["seed"])
        model = GPTNeoXForCausalLM(AutoConfig.from_pretrained(step0))
    torch.save(demo._legacy_state_dict(model, torch.float16), step0 / "pytorch_model.bin")
    return root


def merge_logs(source: Path, revisions: str, caplog, tmp_path: Path) -> str:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_bomerge"):
        hf_bomerge.merge(str(source), revisions, method="sma", evaluate=False, cache_dir=tmp_path, progress=False)
    return caplog.text


def test_a_window_reaching_into_early_training_warns(run_with_init, caplog, tmp_path):
    text = merge_logs(run_with_init, "step0..step350", caplog, tmp_path)
    assert WARNING in text and "merging can hurt (PMA)" in text
    assert "step0→step250→step300" in text  # names where the weights still drift


def test_late_windows_of_the_demo_do_not_warn(trajectory, run_with_init, caplog, tmp_path):
    assert WARNING not in merge_logs(trajectory, "step450..step600", caplog, tmp_path)
    assert WARNING not in merge_logs(trajectory, "step250..step600", caplog, tmp_path)  # every demo checkpoint
    assert WARNING not in merge_logs(run_with_init, "step250..step400", caplog, tmp_path)


def test_the_statistic_separates_drift_from_noise(trajectory, run_with_init):
    late = phase.measure(CheckpointSet([trajectory / f"step{s}" for s in range(450, 601, 50)]))
    early = phase.measure(CheckpointSet([run_with_init / f"step{s}" for s in (0, 250, 300, 350)]))
    assert max(late.cosines) < 0.0 < phase.ALIGNED < early.cosines[0]
    assert early.changes[0] > 2 * max(late.changes)  # the drift from initialization is also the largest change
    assert phase.measure(CheckpointSet([trajectory / "step550", trajectory / "step600"])) is None  # one pair only
