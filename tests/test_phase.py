"""The early-training warning (hf_bomerge.reading.phase) through the product path, on the demo trajectory.

The demo's checkpoints start at step 250, already past the phase where merging hurts (the uniform average of
step250..step400 beats step400 by about 0.1 nats there), so the early window reaches back to an
initialization of the demo's model: its step0, stored like the demo's Pythia-style checkpoints.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

import hf_bomerge
from hf_bomerge import demo
from hf_bomerge.reading import phase
from hf_bomerge.reading.checkpoints import CheckpointSet
from hf_bomerge.reading.verdict import WindowPhase

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


# --- the learning-rate phase and discontinuities (issue 23, items 2 and 3) ---------------------------------------

DECAY_NOTE = "merging gains are expected to be small there"
WINDOW = [f"step{s}" for s in range(400, 601, 50)]


def _weighted(name: str, tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() and not name.endswith(("masked_bias", "inv_freq", "attention.bias"))


def _copy_run(trajectory: Path, root: Path, states: dict[str, dict]) -> Path:
    """A folder source: the demo's files for each step, with `states` as its weights (fp16 .bin, as the demo's)."""
    for name, state in states.items():
        shutil.copytree(trajectory / name, root / name, ignore=shutil.ignore_patterns("pytorch_model.bin"))
        torch.save(state, root / name / "pytorch_model.bin")
    return root


def _state(folder: Path) -> dict:
    return torch.load(folder / "pytorch_model.bin", weights_only=True)


@pytest.fixture(scope="module")
def decayed_run(trajectory: Path, tmp_path_factory) -> Path:
    """A learning-rate decay emulated from the demo's real constant-LR updates Δₖ (steps 400..600): each update
    scaled by 0.5ᵏ, as Adam's steps follow the learning rate, plus a steady direction (the run's drift from
    step250 to step600, a third of it per update) so that consecutive updates align, as a decay's do."""
    real = [_state(trajectory / n) for n in WINDOW]
    drift = {k: v.float() - _state(trajectory / "step250")[k].float() for k, v in real[-1].items() if _weighted(k, v)}
    current = {k: v.float() if _weighted(k, v) else v for k, v in real[0].items()}
    states = {WINDOW[0]: real[0]}
    for k in range(1, len(WINDOW)):
        for name in drift:
            current[name] = current[name] + 0.5 ** (k - 1) * (real[k][name].float() - real[k - 1][name].float()
                                                              + drift[name] / 3)
        states[WINDOW[k]] = {n: v.half() if n in drift else v for n, v in current.items()}
    return _copy_run(trajectory, tmp_path_factory.mktemp("decayed-run"), states)


def _trainer_state(folder: Path, rates: list[float]) -> None:
    """trainer_state.json as the HF Trainer writes it into a checkpoint folder (a log entry every 10 steps)."""
    step = int(folder.name.removeprefix("step"))
    history = [{"epoch": 0.1 * i, "grad_norm": 0.5, "learning_rate": lr, "loss": 4.0, "step": 10 * (i + 1)}
               for i, lr in enumerate(rates)]
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": history}))


def merged(source: Path, revisions: str, caplog, tmp_path: Path):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_bomerge"):
        return hf_bomerge.merge(str(source), revisions, method="sma", evaluate=False, cache_dir=tmp_path,
                                progress=False)


def test_a_decayed_window_gets_the_decay_note_and_not_the_early_warning(decayed_run, trajectory, caplog, tmp_path):
    from hf_bomerge.cli.output import format_summary
    from hf_bomerge.publish.card import render_card

    result = merged(decayed_run, "step400..step600", caplog, tmp_path)
    assert result.phase.stage == "decay" and result.phase.update_ratio < phase.SHRUNK
    assert result.phase.max_cosine > phase.ALIGNED  # aligned updates: the early check alone would have fired
    assert DECAY_NOTE in caplog.text and "sampled updates shrink" in caplog.text and WARNING not in caplog.text
    assert DECAY_NOTE in format_summary(result) and DECAY_NOTE in render_card(result).content
    assert result.summary()["phase"]["stage"] == "decay"
    assert WindowPhase.from_dict(json.loads(json.dumps(result.summary()["phase"]))) == result.phase

    constant = merged(trajectory, "step400..step600", caplog, tmp_path)
    assert constant.phase.stage == "stable" and 0.85 < constant.phase.update_ratio < 1.15
    assert DECAY_NOTE not in caplog.text and DECAY_NOTE not in format_summary(constant)
    assert DECAY_NOTE not in render_card(constant).content


def test_the_logged_learning_rate_decides_where_trainer_state_has_it(decayed_run, trajectory, caplog, tmp_path):
    run = tmp_path / "logged"
    for name in WINDOW:  # the demo's constant-LR weights, logged as a cosine decay: the log is believed
        shutil.copytree(trajectory / name, run / name)
        _trainer_state(run / name, [6e-3 * (1 - 0.15 * i) for i in range(WINDOW.index(name) + 1)])
    result = merged(run, "step400..step600", caplog, tmp_path)
    assert result.phase.stage == "decay" and result.phase.learning_rates[0] == 6e-3
    assert "trainer_state.json" in caplog.text and "0.006 at step400" in caplog.text and DECAY_NOTE in caplog.text

    flat = tmp_path / "flat"
    for name in WINDOW:  # the emulated decay, logged at a constant rate
        shutil.copytree(decayed_run / name, flat / name)
        _trainer_state(flat / name, [6e-3] * 3)
    assert merged(flat, "step400..step600", caplog, tmp_path).phase.stage != "decay"
    (flat / WINDOW[2] / "trainer_state.json").write_text("{not json")  # one revision unreadable: the log is not used
    assert merged(flat, "step400..step600", caplog, tmp_path).phase.stage == "decay"


def test_a_revision_that_jumps_is_named_with_its_evidence(trajectory, run_with_init, caplog, tmp_path):
    names = [f"step{s}" for s in range(300, 601, 50)]
    states = {n: _state(trajectory / n) for n in names}
    init = _state(run_with_init / "step0")
    # step450 serves another checkpoint's first "shard" (the embedding and layer 0), as pythia-12b's step50000
    # serves the final model's (EleutherAI/pythia#206): here the initialization's
    states["step450"] = {k: init[k] if k.startswith(("gpt_neox.embed_in", "gpt_neox.layers.0.")) else v
                         for k, v in states["step450"].items()}
    run = _copy_run(trajectory, tmp_path / "jumped", states)
    result = merged(run, "step300..step600", caplog, tmp_path)
    assert [j.revision for j in result.phase.jumps] == ["step450"]
    jump = result.phase.jumps[0]
    assert jump.neighbours == ["step400", "step500"] and jump.score > phase.JUMP
    assert "step450 jumps relative to its neighbours" in caplog.text
    assert f"from step400 and {jump.distances[1]:.3g} from step500" in caplog.text  # the evidence: the distances
    assert result.summary()["phase"]["jumps"][0]["revision"] == "step450"

    clean = merged(trajectory, "step250..step600", caplog, tmp_path)
    assert clean.phase.jumps == [] and "jumps" not in caplog.text


def test_a_swapped_shard_is_found_even_where_the_evenly_spaced_samples_miss_it(trajectory, run_with_init, caplog,
                                                                                 tmp_path):
    from safetensors.torch import save_file

    names = [f"step{s}" for s in range(400, 601, 50)]
    init = _state(run_with_init / "step0")
    run = tmp_path / "sharded"
    for name in names:  # two shards: the head alone in the second (the largest matrix: no evenly spaced sample)
        state = {k: v.contiguous() for k, v in _state(trajectory / name).items()}
        if name == "step500":  # serves another checkpoint's second shard
            state["lm_head.weight"] = init["lm_head.weight"].contiguous()
        shutil.copytree(trajectory / name, run / name, ignore=shutil.ignore_patterns("pytorch_model.bin"))
        files = {"model-00001-of-00002.safetensors": {k: v for k, v in state.items() if k != "lm_head.weight"},
                 "model-00002-of-00002.safetensors": {"lm_head.weight": state["lm_head.weight"]}}
        for file, part in files.items():
            save_file(part, run / name / file, metadata={"format": "pt"})
        index = {"metadata": {"total_size": sum(v.nbytes for v in state.values())},
                 "weight_map": {k: f for f, part in files.items() for k in part}}
        (run / name / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpts = CheckpointSet([run / n for n in names], names)
    assert "lm_head.weight" not in phase.sample_names(ckpts)[:phase.SAMPLE_TENSORS]
    result = merged(run, "step400..step600", caplog, tmp_path)
    assert [(j.revision, j.tensor) for j in result.phase.jumps] == [("step500", "lm_head.weight")]
