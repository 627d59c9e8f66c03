"""Rolling merges while a run trains: `hf-bomerge watch` on a growing folder and a growing Hub repo (killed
and resumed), the readiness checks, and `BOMergeCallback` in a real `transformers.Trainer` run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hf_bomerge.errors import WatchError
from hf_bomerge.searching.watch import _claim, read_ledger, shifted, watch_once
from hf_bomerge.sources import arrivals, folder_incomplete

sys.path.insert(0, str(Path(__file__).resolve().parent))
from testhub import pythia_branches

pytestmark = pytest.mark.e2e  # the test Hub, subprocess CLIs, real searches or training

TOKEN = "hf_test_watch_token_42"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "hf_bomerge.cli", "watch", *args]


def data_args(trajectory: Path, cache: Path) -> list[str]:
    return ["--dataset", str(trajectory / "heldout" / "validation.jsonl"), "--max-eval-tokens", "2048",
            "--cache-dir", str(cache)]


def wait_for(condition, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the watcher exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def copy_revision(src: Path, dest: Path) -> None:
    """As a careful writer does: into a hidden temporary folder, then renamed."""
    tmp = dest.parent / f".{dest.name}.tmp"
    shutil.copytree(src, tmp)
    tmp.rename(dest)


def test_shifted_keeps_each_age_weight():
    assert shifted([0.1, 0.2, 0.3, 0.4], 4) == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert shifted([0.5, 0.5], 3) == [0.0, 0.5, 0.5]
    assert shifted([0.2, 0.3, 0.5], 2) == pytest.approx([0.375, 0.625])


def test_revisions_still_being_written_are_not_ready(trajectory, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trajectory / "step450", run / "step450")
    assert folder_incomplete(run / "step450") == ""
    assert folder_incomplete(run / "step450", settle=60) != ""  # just written: not settled yet

    half = run / "step500"  # a .bin cut short: no zip central directory yet
    half.mkdir()
    shutil.copy(trajectory / "step500" / "config.json", half)
    data = (trajectory / "step500" / "pytorch_model.bin").read_bytes()
    (half / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    assert "still being written" in folder_incomplete(half)

    st = run / "step550"  # a safetensors file shorter than its header says
    st.mkdir()
    shutil.copy(trajectory / "main" / "config.json", st)
    data = (trajectory / "main" / "model.safetensors").read_bytes()
    (st / "model.safetensors").write_bytes(data[:-100])
    assert "still being written" in folder_incomplete(st)
    (st / "model.safetensors").write_bytes(data)
    assert folder_incomplete(st) == ""

    sharded = run / "step600"  # an index naming a shard not written yet
    sharded.mkdir()
    shutil.copy(trajectory / "main" / "config.json", sharded)
    shutil.copy(trajectory / "main" / "model.safetensors", sharded / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "model-00002-of-00002.safetensors is missing" in folder_incomplete(sharded)

    trainer = run / "checkpoint-700"  # a Trainer checkpoint before its trainer_state.json
    shutil.copytree(trajectory / "step600", trainer)
    (trainer / "training_args.bin").write_bytes(b"")  # what the Trainer writes beside the weights, before the state
    assert "trainer_state.json" in folder_incomplete(trainer)
    (trainer / "trainer_state.json").write_text("{}")
    assert folder_incomplete(trainer) == ""

    (run / "no-weights-7").mkdir()
    shutil.copy(trajectory / "step600" / "config.json", run / "no-weights-7")
    seen = {a.name: a.ready for a in arrivals(str(run), settle=0)}
    assert seen == {"step450": True, "step500": False, "step550": True, "step600": False,
                    "checkpoint-700": True, "no-weights-7": False}


def test_one_writer_per_output_and_clear_errors(trajectory, tmp_path):
    with _claim(tmp_path / "out"):
        with pytest.raises(WatchError, match="Another hf-bomerge watch is writing"):
            watch_once(str(trajectory), tmp_path / "out")
    with pytest.raises(WatchError, match="--window must be at least 2"):
        watch_once(str(trajectory), tmp_path / "out", window=1)
    run = tmp_path / "run"
    shutil.copytree(trajectory / "step450", run / "step450")
    with pytest.raises(WatchError, match="first revision"):
        watch_once(str(run), tmp_path / "out", settle=0)
    result = subprocess.run(cli(str(run), "--output", str(tmp_path / "o2"), "--window", "1"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--window must be at least 2" in result.stderr
    assert "Traceback" not in result.stderr


def test_watch_folder_waits_for_partial_revision_survives_kill_and_resumes(trajectory, tmp_path):
    run, out, cache = tmp_path / "run", tmp_path / "out", tmp_path / "cache"
    for step in ("step400", "step450"):
        copy_revision(trajectory / step, run / step)
    # 40 trials: a round lasts seconds even on a quiet machine (10 took under one), so the kill below lands in it
    args = ["--output", str(out), "--window", "3", "--trials", "40", "--poll", "0.3", "--settle", "0.5",
            *data_args(trajectory, cache)]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cli(str(run), *args), stdout=subprocess.DEVNULL, stderr=log)
    stderr = lambda: (tmp_path / "first.log").read_text()
    try:
        wait_for(lambda: len(read_ledger(out)) == 1, 300, proc, "the first round")
        # step500 appears half-written: the watcher waits for it and reads nothing of it.
        part = run / "step500"
        part.mkdir()
        for f in (trajectory / "step500").iterdir():
            if f.name != "pytorch_model.bin":
                shutil.copy(f, part)
        data = (trajectory / "step500" / "pytorch_model.bin").read_bytes()
        (part / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
        wait_for(lambda: "waiting for step500" in stderr(), 60, proc, "the wait message")
        time.sleep(2)
        assert len(read_ledger(out)) == 1 and not (out / "step500").exists()
        (part / "pytorch_model.bin").write_bytes(data)
        # Killed (SIGKILL: no cleanup at all) in the middle of step500's round.
        wait_for(lambda: "trials:" in stderr().partition("round step500:")[2], 120, proc,
                 "the second round's trials to start")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert [r["latest"] for r in read_ledger(out)] == ["step450"], "the kill must land mid-round"

    copy_revision(trajectory / "step550", run / "step550")
    again = subprocess.run(cli(str(run), *args, "--stop-after", "2", "--json"), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming after step450" in again.stderr
    ledger = read_ledger(out)
    assert [r["latest"] for r in ledger] == ["step450", "step500", "step550"]  # none lost, none twice
    assert [json.loads(line) for line in again.stdout.splitlines()] == ledger[1:]
    assert ledger[2]["revisions"] == ["step450", "step500", "step550"]
    assert "previous round" in ledger[1]["baselines"]  # warm-started from step450's round
    for record in ledger:
        folder = out / record["latest"]
        assert record["output"] == str(folder)
        assert (folder / "model.safetensors").is_file() and (folder / "README.md").is_file()
        assert json.loads((folder / "bomerge_result.json").read_text())["weights"] == record["weights"]
        mergekit = yaml.safe_load((folder / "mergekit_config.yml").read_text())  # each round, for mergekit too
        assert [m["parameters"]["weight"][-1]["value"] for m in mergekit["models"]] == record["weights"]  # unfiltered
        assert record["trials"] == 40
    assert (out / "watch.png").stat().st_size > 0
    assert not list(out.glob(".*.partial"))


def test_watch_hub_branches_pushes_each_round(test_hub, trajectory, tmp_path):
    repo, merges = "bomerge-user/growing-run", "bomerge-user/growing-run-merges"
    branches = pythia_branches(trajectory, ["step400", "step450"])
    test_hub.add_model_repo(repo, branches)
    out = tmp_path / "out"
    env = {**os.environ, "HF_TOKEN": TOKEN}
    proc = subprocess.Popen(cli(repo, "--output", str(out), "--window", "2", "--trials", "6", "--poll", "0.5",
                                "--stop-after", "2", "--push-to-hub", merges, *data_args(trajectory, tmp_path / "c")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for(lambda: len(read_ledger(out)) == 1, 300, proc, "the first round")
        # A new branch, and one whose index names a shard that is not pushed yet (never read).
        index = {"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors",
                                                "y": "model-00002-of-00002.safetensors"}}
        partial = {**{k: v for k, v in branches["step450"].items() if k != "pytorch_model.bin"},
                   "model.safetensors.index.json": json.dumps(index),
                   "model-00001-of-00002.safetensors": trajectory / "main" / "model.safetensors"}
        test_hub.add_model_repo(repo, {"step500": pythia_branches(trajectory, ["step500"])["step500"],
                                       "step550": partial})
        seen = {a.name: a for a in arrivals(repo)}
        assert seen["step500"].ready and not seen["step550"].ready
        assert "model-00002-of-00002.safetensors" in seen["step550"].why
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    ledger = read_ledger(out)
    assert [r["latest"] for r in ledger] == ["step450", "step500"]
    assert ledger[1]["revisions"] == ["step450", "step500"]
    assert ledger[1]["shas"] == [test_hub.branch_log(repo, b)[0] for b in ("step450", "step500")]

    from huggingface_hub import HfApi, hf_hub_download

    refs = {b.name for b in HfApi().list_repo_refs(merges).branches}
    assert {"step450-bomerge", "step500-bomerge"} <= refs
    pushed = json.loads(Path(hf_hub_download(merges, "bomerge_result.json", revision="step500-bomerge")).read_text())
    assert pushed["weights"] == ledger[1]["weights"] and pushed["loss"] == ledger[1]["loss"]
    assert TOKEN not in err and all(TOKEN.encode() not in p.read_bytes() for p in out.rglob("*") if p.is_file())


def test_trainer_callback_merges_beside_training_and_logs_fresh_losses(trajectory, tmp_path):
    import torch
    from datasets import Dataset
    from measure import heldout_loss
    from transformers import (
        AutoTokenizer,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    from hf_bomerge.integrations import BOMergeCallback

    tokenizer = AutoTokenizer.from_pretrained(trajectory / "step250")
    config = GPTNeoXConfig.from_pretrained(trajectory / "step250")
    config.dtype = torch.float32
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config)
    text = (trajectory / "heldout" / "validation.txt").read_text()
    ids = tokenizer(text[:200_000])["input_ids"]
    blocks = [ids[i:i + 64] for i in range(0, len(ids) - 64, 64)][:400]
    train = Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    heldout = trajectory / "heldout" / "ood.jsonl"

    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=24, save_steps=6, logging_steps=6,
                             per_device_train_batch_size=8, learning_rate=3e-3, lr_scheduler_type="constant",
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0, save_only_model=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                      data_collator=default_data_collator)
    callback = BOMergeCallback(trainer, window=3, trials=7, dataset=str(heldout), max_eval_tokens=1024,
                               block_size=64, cache_dir=str(tmp_path / "cache"))
    trainer.add_callback(callback)
    started = time.monotonic()
    trainer.train()
    assert time.monotonic() - started < 400 and not callback.failed

    out = tmp_path / "run" / "bomerge"
    ledger = read_ledger(out)
    assert [r["latest"] for r in ledger] == ["checkpoint-12", "checkpoint-18", "checkpoint-24"]
    assert ledger[2]["revisions"] == ["checkpoint-12", "checkpoint-18", "checkpoint-24"]
    logged = [h for h in trainer.state.log_history if "bomerge/loss" in h]
    assert [h["bomerge/checkpoint_step"] for h in logged] == [12, 18, 24]

    # Each logged loss is the saved merged model's on the confirm part, measured again here with plain
    # transformers (tests/measure.py), and so is the latest checkpoint's that the gain is taken against.
    for record, logs in zip(ledger, logged):
        fresh = heldout_loss(out / record["latest"], str(heldout), block_size=64, max_tokens=1024, part="confirm")
        latest = heldout_loss(tmp_path / "run" / record["latest"], str(heldout), block_size=64, max_tokens=1024,
                              part="confirm")
        assert logs["bomerge/loss"] == pytest.approx(fresh, abs=2e-5)
        assert logs["bomerge/gain_vs_latest"] == pytest.approx(latest - fresh, abs=2e-5)
    assert (out / "watch.png").is_file()
