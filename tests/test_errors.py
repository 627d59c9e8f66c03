"""What happens when… : every user mistake is one paragraph and exit code 2; nothing finished is lost."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

from hf_bomerge.cli import main


@pytest.fixture()
def run(trajectory: Path, tmp_path: Path):
    """A private copy of the last 3 demo checkpoints (to break), and a CLI runner over it."""
    steps = json.loads((trajectory / "trajectory.json").read_text())["revisions"][-3:]
    src = tmp_path / "run"
    for s in steps:
        shutil.copytree(trajectory / s, src / s)
    shutil.copytree(trajectory / "heldout", tmp_path / "heldout")

    def cli(*args: str, capsys=None):
        code = main([*args, "--quiet", "--cache-dir", str(tmp_path / "cache")])
        return code

    cli.src, cli.steps, cli.tmp, cli.heldout = src, steps, tmp_path, tmp_path / "heldout"
    return cli


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("hf-bomerge: error:")]
    assert len(lines) == 1, err  # one paragraph
    return lines[0]


def _fixed(run, *extra: str) -> list[str]:
    return [str(run.src), "--revisions", "last:3", "--method", "sma", "--output", str(run.tmp / "out"), *extra]


def test_missing_dataset(run, capsys):
    assert run(*_fixed(run, "--dataset", str(run.tmp / "nope.jsonl"))) == 2
    assert "nope.jsonl" in _error(capsys)


def test_dataset_without_the_text_column_lists_its_columns(run, capsys):
    (run.tmp / "qa.jsonl").write_text('{"question": "a", "answer": "b"}\n' * 50)
    assert run(*_fixed(run, "--dataset", str(run.tmp / "qa.jsonl"))) == 2
    msg = _error(capsys)
    assert "'text'" in msg and "question" in msg and "--text-column" in msg


def test_empty_dataset(run, capsys):
    (run.tmp / "empty.jsonl").write_text('{"text": ""}\n{"text": "   "}\n')
    assert run(*_fixed(run, "--dataset", str(run.tmp / "empty.jsonl"))) == 2
    assert "no non-empty text" in _error(capsys)


def test_dataset_shorter_than_one_block(run, capsys):
    (run.tmp / "short.txt").write_text("x = 1\n")
    assert run(*_fixed(run, "--dataset", str(run.tmp / "short.txt"))) == 2
    msg = _error(capsys)
    assert "fewer than one block" in msg and "--block-size" in msg


def test_different_tokenizers_are_refused(run, capsys):
    tok = run.src / run.steps[0] / "tokenizer.json"
    data = json.loads(tok.read_text())
    vocab = data["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two token ids swapped
    tok.write_text(json.dumps(data))
    assert run(*_fixed(run, "--no-eval")) == 2
    msg = _error(capsys)
    assert run.steps[0] in msg and run.steps[-1] in msg and "tokenizer" in msg


def test_nan_in_a_checkpoint_names_tensor_and_revision(run, capsys):
    path = run.src / run.steps[1] / "pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    state["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"][0, 0] = float("nan")
    torch.save(state, path)
    assert run(*_fixed(run, "--no-eval")) == 2
    msg = _error(capsys)
    assert "gpt_neox.layers.1.mlp.dense_h_to_4h.weight" in msg and run.steps[1] in msg
    assert not (run.tmp / "out").exists()


def test_truncated_safetensors_names_the_file(run, capsys):
    folder = run.src / run.steps[0]
    from safetensors.torch import save_file

    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert run(*_fixed(run, "--no-eval")) == 2
    assert "model.safetensors" in _error(capsys)


def test_remote_code_needs_the_flag(run, capsys):
    config = run.src / run.steps[-1] / "config.json"
    data = json.loads(config.read_text())
    data["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    config.write_text(json.dumps(data))
    assert run(*_fixed(run)) == 2
    msg = _error(capsys)
    assert "--trust-remote-code" in msg and "modeling_evil" in msg


def test_existing_output_not_ours_is_refused_unless_overwrite(run, capsys):
    out = run.tmp / "out"
    out.mkdir()
    (out / "precious.txt").write_text("my work")
    assert run(*_fixed(run, "--no-eval")) == 2
    assert "--overwrite" in _error(capsys)
    assert (out / "precious.txt").read_text() == "my work"
    assert run(*_fixed(run, "--no-eval", "--overwrite")) == 0
    assert (out / "model.safetensors").is_file() and not (out / "precious.txt").exists()


@pytest.mark.e2e
def test_a_search_whose_export_failed_exports_on_the_rerun(run, capsys):
    """The export is claimed once per study budget; a failed export gives the claim back."""
    out = run.tmp / "out"
    out.mkdir()
    (out / "precious.txt").write_text("my work")
    search = [str(run.src), "--revisions", "last:3", "--dataset", str(run.heldout / "validation.jsonl"),
              "--max-eval-tokens", "2048", "--trials", "5", "--output", str(out)]
    assert run(*search) == 2
    assert "--overwrite" in _error(capsys)
    assert run(*search, "--overwrite") == 0  # no trial re-runs; this run may export now
    assert (out / "model.safetensors").is_file()
    assert run(*search, "--overwrite") == 0  # exported already: nothing is written again
    assert "is exported by" in capsys.readouterr().err


def test_invalid_weights_and_unknown_revisions(run, capsys):
    assert run(str(run.src), "--revisions", "last:3", "--weights", "0.5,0.5", "--output", str(run.tmp / "o")) == 2
    assert "3 checkpoints" in _error(capsys)
    assert run(str(run.src), "--revisions", "step1", "--method", "sma", "--output", str(run.tmp / "o")) == 2
    assert run.steps[0] in _error(capsys)


@pytest.mark.e2e
def test_search_killed_mid_trial_resumes_to_the_same_budget(run, tmp_path):
    """A real subprocess, SIGKILLed while the study runs; the re-run finishes the budget and exports once."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = [sys.executable, "-m", "hf_bomerge.cli", str(run.src), "--revisions", "last:3",
            "--dataset", str(run.heldout / "validation.jsonl"), "--max-eval-tokens", "65536", "--trials", "9",
            "--storage", storage, "--study-name", "killed", "--output", str(tmp_path / "out"), "--quiet",
            "--cache-dir", str(tmp_path / "cache"), "--json"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    done = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            study = optuna.load_study(study_name="killed", storage=storage)
            done = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
        except Exception:
            done = 0
        if done >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    time.sleep(0.4)  # into the next trial (~1 s each), past its first heartbeat
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out").exists()
    time.sleep(11)  # the dead trial's heartbeat goes stale (study.GRACE_S)
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    study = optuna.load_study(study_name="killed", storage=storage)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert summary["trials"] == len(complete) == 9
    assert set(summary["baselines"]) == {*run.steps, "uniform", "ema"}  # an interrupted seed was re-run
    params = [json.dumps(t.params, sort_keys=True) for t in complete if "bomerge_copy_of" not in t.user_attrs]
    assert len(set(params)) == len(params)  # no trial ran twice (a GP re-proposal reuses the known value)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


@pytest.mark.e2e
def test_corrupt_download_is_fetched_again_once(test_hub, tmp_path, caplog):
    """A weight file truncated in the HF cache (a disk fault, a killed copy) is downloaded again."""
    args = [test_hub.repo_id, "--revisions", "last:2", "--method", "sma", "--no-eval", "--quiet",
            "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "--output", str(tmp_path / "a")]) == 0
    blobs = [p for p in (tmp_path / "cache").rglob("pytorch_model.bin")]
    assert len(blobs) == 2
    target = blobs[0].resolve()  # the snapshot entry is a link to the blob
    target.write_bytes(target.read_bytes()[:1000])
    assert main([*args, "--output", str(tmp_path / "b")]) == 0
    assert "Downloading the revisions again" in caplog.text and "pytorch_model.bin" in caplog.text
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()


@pytest.mark.e2e
def test_a_plan_that_does_not_fit_is_refused_before_downloading(test_hub, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = [test_hub.repo_id, "--revisions", "last:4", "--dataset", test_hub.dataset_id, "--split", "validation",
            "--cache-dir", str(cache), "--output", str(tmp_path / "out"), "--quiet"]
    assert main([*args, "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    sizes = [(test_hub.trajectory / r / "pytorch_model.bin").stat().st_size for r in plan["revisions"]]
    assert plan["download_bytes"] == sum(sizes) and plan["fits"] is True
    assert not list(cache.rglob("*.bin"))  # a plan downloads no weights

    budget = str(plan["streamed_bytes"] - 1)  # one byte short of even the model and its activations
    assert main([*args, "--max-memory", budget]) == 2
    msg = _error(capsys)
    assert "--device-map" in msg and "available" in msg
    assert not list(cache.rglob("*.bin")) and not (tmp_path / "out").exists()
    # a fixed merge without evaluation streams tensor by tensor: the same budget is enough (and no held-out data:
    # --no-eval with --dataset is refused)
    fixed = [a for a in args if a not in ("--dataset", test_hub.dataset_id, "--split", "validation")]
    assert main([*fixed, "--max-memory", budget, "--method", "ema", "--no-eval"]) == 0


@pytest.mark.e2e
def test_checkpoints_that_do_not_fit_beside_the_model_are_streamed_with_the_same_numbers(test_hub, tmp_path,
                                                                                       capsys, caplog):
    args = [test_hub.repo_id, "--revisions", "last:3", "--dataset", test_hub.dataset_id, "--split", "validation",
            "--method", "wma", "--cache-dir", str(tmp_path / "cache"), "--quiet", "--json"]
    assert main([*args, "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["mode"] == "resident"
    short = str(plan["resident_bytes"] - 1)
    assert main([*args, "--dry-run", "--max-memory", short]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mode"] == "streamed"
    assert main([*args, "--output", str(tmp_path / "resident")]) == 0
    resident = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*args, "--output", str(tmp_path / "streamed"), "--max-memory", short]) == 0
    streamed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "streamed mode" in caplog.text
    assert streamed["loss"] == resident["loss"]  # the export's arithmetic, bit for bit


@pytest.mark.e2e
def test_unreachable_hub_is_one_paragraph(tmp_path):
    from testhub import free_port

    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}  # nothing listens
    proc = subprocess.run([sys.executable, "-m", "hf_bomerge.cli", "EleutherAI/pythia-160m", "--dry-run",
                           "--cache-dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Could not connect" in proc.stderr and "EleutherAI/pythia-160m" in proc.stderr


def test_a_bin_that_is_not_only_tensors_is_never_unpickled(run, capsys):
    marker = run.tmp / "unpickled"
    (run.src / run.steps[0] / "pytorch_model.bin").write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    assert run(*_fixed(run, "--no-eval")) == 2
    msg = _error(capsys)
    assert "pytorch_model.bin" in msg and "tensors" in msg
    assert not marker.exists()


@pytest.mark.e2e
def test_sigterm_during_the_search_saves_the_study_and_says_how_to_resume(run, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = [sys.executable, "-m", "hf_bomerge.cli", str(run.src), "--revisions", "last:3",
            "--dataset", str(run.heldout / "validation.jsonl"), "--max-eval-tokens", "65536", "--trials", "8",
            "--storage", storage, "--study-name", "term", "--output", str(tmp_path / "out"), "--quiet",
            "--cache-dir", str(tmp_path / "cache")]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, done = time.time() + 300, 0
    while time.time() < deadline and proc.poll() is None and done < 2:
        try:
            done = len(optuna.load_study(study_name="term", storage=storage).get_trials(
                states=(optuna.trial.TrialState.COMPLETE,)))
        except Exception:
            pass
        time.sleep(0.05)
    time.sleep(0.4)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "run the same command again" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    study = optuna.load_study(study_name="term", storage=storage)
    finished = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
    assert finished >= 2
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in study.trials)  # marked failed, not left running
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    complete = optuna.load_study(study_name="term", storage=storage).get_trials(
        states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 8
    # the interrupted trial (a baseline seed here) ran again: every baseline is in the study exactly once
    assert sorted(t.user_attrs["seed"] for t in complete if "seed" in t.user_attrs) == sorted(
        [*run.steps, "uniform", "ema"])


@pytest.mark.e2e
def test_not_enough_disk_is_refused_before_downloading(test_hub, tmp_path, capsys, monkeypatch):
    """A full disk cannot be produced here safely, so only `shutil.disk_usage` is replaced (the one mock)."""
    import shutil as _shutil

    from hf_bomerge import plan as plan_module

    usage = _shutil.disk_usage(tmp_path)
    monkeypatch.setattr(plan_module.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    cache = tmp_path / "cache"
    code = main([test_hub.repo_id, "--revisions", "last:2", "--method", "sma", "--no-eval", "--quiet",
                 "--cache-dir", str(cache), "--output", str(tmp_path / "out")])
    assert code == 2
    msg = _error(capsys)
    assert "free" in msg and "--cache-dir" in msg
    assert not list(cache.rglob("*.bin")) and not (tmp_path / "out").exists()


def test_export_from_a_storage_without_the_study_says_where_to_look(tmp_path, capsys):
    assert main(["export", "--storage", f"sqlite:///{tmp_path / 'empty.db'}", "--quiet"]) == 2
    assert "holds no study" in _error(capsys)
    storage = f"sqlite:///{tmp_path / 'two.db'}"
    for name in ("a", "b"):
        optuna.create_study(storage=storage, study_name=name)
    assert main(["export", "--storage", storage, "--study-name", "c", "--quiet"]) == 2
    assert "No study 'c'" in (msg := _error(capsys)) and "a, b" in msg
    assert main(["show", "--storage", storage, "--json"]) == 0  # without a name: the storage's studies
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [s["study"] for s in listed["studies"]] == ["a", "b"]


def test_an_empty_dataset_file_says_it_is_empty(run, capsys):
    (run.tmp / "blank.jsonl").write_text("")
    assert run(*_fixed(run, "--dataset", str(run.tmp / "blank.jsonl"))) == 2
    msg = _error(capsys)
    assert "blank.jsonl" in msg and "is empty" in msg


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "disk is full"), (errno.EACCES, "No permission")])
def test_a_full_disk_or_a_permission_error_is_not_blamed_on_the_hub(test_hub, tmp_path, capsys, monkeypatch, code,
                                                                     words):
    """Neither can be produced here safely (the tests run as root), so the download raises the OSError the
    file system would (the one mock): wrapped, as huggingface_hub re-raises it."""
    from hf_bomerge.sources import hub

    def full(*args, **kwargs):
        try:
            raise OSError(code, os.strerror(code), str(tmp_path / "cache" / "blob.incomplete"))
        except OSError as err:
            raise RuntimeError("download failed") from err

    monkeypatch.setattr(hub, "snapshot_download", full)
    code_ = main([test_hub.repo_id, "--revisions", "last:2", "--method", "sma", "--no-eval", "--quiet",
                  "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "out")])
    assert code_ == 2
    msg = _error(capsys)
    assert words in msg and "blob.incomplete" in msg and "reach" not in msg and "connect" not in msg


def test_a_source_without_a_tokenizer(run, capsys, caplog, trajectory):
    """HF Trainer outputs often hold no tokenizer: --no-eval writes the merge without one and says so;
    evaluating needs --tokenizer, which then also goes into the merge."""
    for step in run.steps:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (run.src / step / name).unlink(missing_ok=True)
    assert run(*_fixed(run, "--no-eval")) == 0
    assert not (run.tmp / "out" / "tokenizer.json").exists() and (run.tmp / "out" / "model.safetensors").is_file()
    assert "without one" in caplog.text
    capsys.readouterr()
    heldout = ["--dataset", str(run.heldout / "validation.jsonl"), "--max-eval-tokens", "512"]
    assert run(*_fixed(run, *heldout, "--overwrite")) == 2
    assert "--tokenizer" in _error(capsys)
    assert run(*_fixed(run, *heldout, "--overwrite", "--tokenizer", str(trajectory / "main"))) == 0
    assert (run.tmp / "out" / "tokenizer.json").read_bytes() == (trajectory / "main" / "tokenizer.json").read_bytes()


@pytest.mark.e2e  # five subprocess CLI runs with real searches and exports
def test_a_finished_search_rerun_writes_its_missing_output_and_a_dead_exporters_claim_expires(run, tmp_path):
    """Real processes: a lone re-run is not a concurrent worker, and a killed exporter's claim is not forever."""
    from hf_bomerge.searching import workers
    from hf_bomerge.searching.study import open_storage

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    out = tmp_path / "out"
    args = [sys.executable, "-m", "hf_bomerge.cli", str(run.src), "--revisions", "last:3", "--dataset",
            str(run.heldout / "validation.jsonl"), "--max-eval-tokens", "512", "--trials", "4", "--storage", storage,
            "--study-name", "done", "--output", str(out), "--quiet", "--cache-dir", str(tmp_path / "cache")]
    first = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0 and (out / "model.safetensors").is_file(), first.stderr
    weights = (out / "model.safetensors").read_bytes()
    shutil.rmtree(out)
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert (out / "model.safetensors").read_bytes() == weights  # written again, the same merge
    kept = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert kept.returncode == 0 and "is exported by" in kept.stderr  # it exists: nothing written twice

    # An exporter SIGKILLed mid-export: its claim (a dead pid on this host) is taken over by the next run.
    rdb = open_storage(storage)
    workers.release_export(rdb, "done", 4)
    shutil.rmtree(out)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert workers.claim_export(rdb, "done", 4, {"output": str(out)}) is None
    lock = optuna.load_study(study_name="done:export@4", storage=rdb)
    lock.set_user_attr("claim", {**lock.user_attrs["claim"], "pid": dead.pid, "worker": f"host:{dead.pid}"})
    assert workers.is_stale(workers.export_status(rdb, "done", 4))
    taken = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert taken.returncode == 0, taken.stderr
    assert (out / "model.safetensors").read_bytes() == weights
    assert workers.export_status(rdb, "done", 4)["done"]


def test_an_export_claim_without_a_heartbeat_expires(tmp_path):
    import datetime

    from hf_bomerge.searching import workers

    old = (datetime.datetime.now(datetime.timezone.utc)
           - datetime.timedelta(seconds=workers.CLAIM_STALE_S + 5)).isoformat(timespec="seconds")
    fresh = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    other_host = {"host": "elsewhere", "pid": 1, "worker": "elsewhere:1"}
    assert workers.is_stale({**other_host, "beat": old})
    assert not workers.is_stale({**other_host, "beat": fresh})
    assert not workers.is_stale({**other_host, "beat": old, "done": fresh})  # a finished export stays
