"""End to end, as a user types it: `hf-bomerge` against the test Hub (olah on 127.0.0.1) and local sources."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from measure import heldout_loss, reference_merge
from safetensors.torch import load_file

from hf_bomerge.cli import main

JSON_KEYS = {"schema", "source", "revisions", "shas", "weights", "objective", "loss", "loss_part", "baselines",
             "generalization", "trials", "study", "output", "eval_dtype", "confirm", "layer_weights", "duplicates",
             "phase"}


def hf_bomerge(*args: str, cache: Path) -> subprocess.CompletedProcess:
    """The installed console script, in a real subprocess (downloads, studies and data cached in `cache`)."""
    exe = shutil.which("hf-bomerge")
    cmd = [exe] if exe else [sys.executable, "-m", "hf_bomerge.cli"]
    return subprocess.run([*cmd, *args, "--cache-dir", str(cache)], capture_output=True, text=True, timeout=900)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def hub_run(test_hub, tmp_path_factory):
    """One full search against the test Hub, shared by the assertions below."""
    tmp = tmp_path_factory.mktemp("hub_run")
    first, last = test_hub.step_branches[-4], test_hub.step_branches[-1]
    proc = hf_bomerge(test_hub.repo_id, "--revisions", f"{first}..{last}", "--dataset", test_hub.dataset_id,
                      "--split", "validation", "--eval-dataset", f"{test_hub.dataset_id}@ood", "--trials", "10",
                      "--output", str(tmp / "merged"), "--json", cache=tmp / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, proc, last_json(proc.stdout)


@pytest.mark.e2e
def test_json_summary_has_the_contract_shape(hub_run, test_hub):
    tmp, proc, summary = hub_run
    assert set(summary) == JSON_KEYS and summary["schema"] == 4  # 4: loss_part, confirm by document
    assert summary["phase"]["stage"] in ("stable", "decay", "early") and summary["phase"]["jumps"] == []
    assert summary["layer_weights"] is None  # global weights: no depth groups
    assert summary["loss_part"] == "search" and summary["confirm"]["unit"] in ("documents", "runs")
    assert summary["source"] == test_hub.repo_id
    assert summary["revisions"] == test_hub.step_branches[-4:]  # training order, oldest first
    assert summary["shas"] == [test_hub.shas[r] for r in summary["revisions"]]
    assert len(summary["weights"]) == 4 and abs(sum(summary["weights"]) - 1) < 1e-9
    assert summary["trials"] == 10
    assert summary["output"] == str(tmp / "merged")
    assert set(summary["baselines"]) == {*summary["revisions"], "uniform", "ema"}
    assert list(summary["generalization"]) == [f"{test_hub.dataset_id}@ood"]
    assert "trials" in proc.stderr  # progress goes to stderr, the JSON object alone is stdout's last line


@pytest.mark.e2e
def test_every_reported_number_is_an_independently_measured_loss(hub_run, test_hub, tmp_path):
    """The merge's loss and each baseline's equal transformers' loss of a float64 reference merge of the same
    weights on blocks built without hf-bomerge (not a comparison of the study's trials with each other)."""
    from huggingface_hub import snapshot_download

    from hf_bomerge.merging import weights as W

    _, _, summary = hub_run
    names, n = summary["revisions"], len(summary["revisions"])
    folders = [Path(snapshot_download(test_hub.repo_id, revision=sha, cache_dir=tmp_path / "hub"))
               for sha in summary["shas"]]
    cases = {"merged": summary["weights"], "uniform": W.uniform(n), "ema": W.ema(n, 0.2),
             **{name: W.one_hot(n, i) for i, name in enumerate(names)}}
    reported = {"merged": summary["loss"], **summary["baselines"]}
    confirmed = {"merged": summary["confirm"]["loss"], **summary["confirm"]["baselines"]}
    for label, weights in cases.items():
        folder = reference_merge(folders, weights, tmp_path / label)
        search = heldout_loss(folder, test_hub.dataset_id, "validation", part="search")
        confirm = heldout_loss(folder, test_hub.dataset_id, "validation", part="confirm")
        assert (search, confirm) == pytest.approx((reported[label], confirmed[label]), abs=2e-5), label


@pytest.mark.e2e
def test_output_loads_and_its_loss_matches_the_report(hub_run, test_hub):
    from transformers import AutoModelForCausalLM

    tmp, _, summary = hub_run
    out = Path(summary["output"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "bomerge_recipe.yaml",
            "bomerge_result.json"} <= {p.name for p in out.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == "gpt_neox"
    assert heldout_loss(out, test_hub.dataset_id, "validation", part="search") == pytest.approx(summary["loss"], abs=2e-5)
    assert not list(out.parent.glob(".merged.*"))  # no staging folder left behind


@pytest.mark.e2e
def test_card_lists_every_revision_with_its_sha(hub_run):
    from huggingface_hub import ModelCard

    _, _, summary = hub_run
    card = ModelCard.load(Path(summary["output"]) / "README.md")
    for sha in summary["shas"]:
        assert sha in card.text
    assert card.data.base_model == summary["source"]
    # The model-index holds the number the search never saw: the confirm part's loss.
    assert card.data.eval_results[0].metric_value == pytest.approx(summary["confirm"]["loss"], abs=1e-6)


@pytest.mark.e2e
def test_recipe_reproduces_the_merge_bit_for_bit(hub_run, tmp_path):
    _, _, summary = hub_run
    out = Path(summary["output"])
    code = main(["--recipe", str(out / "bomerge_recipe.yaml"), "--output", str(tmp_path / "again"), "--quiet",
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.e2e
def test_rerun_resumes_the_study_instead_of_starting_over(hub_run, test_hub, capsys):
    tmp, _, summary = hub_run
    first, last = summary["revisions"][0], summary["revisions"][-1]
    code = main([test_hub.repo_id, "--revisions", f"{first}..{last}", "--dataset", test_hub.dataset_id,
                 "--split", "validation", "--eval-dataset", f"{test_hub.dataset_id}@ood", "--trials", "10",
                 "--output", summary["output"], "--json", "--quiet", "--cache-dir", str(tmp / "cache")])
    assert code == 0
    again = last_json(capsys.readouterr().out)
    assert again["study"] == summary["study"] and again["trials"] == 10
    assert again["weights"] == summary["weights"]  # nothing re-run: the same best trial


@pytest.mark.e2e
@pytest.mark.parametrize("spec, expect", [("step999999", "nearest"), ("step1..step2", "nearest")])
def test_unknown_revision_lists_the_nearest_branches(test_hub, tmp_path, capsys, spec, expect):
    code = main([test_hub.repo_id, "--revisions", spec, "--output", str(tmp_path / "x"), "--quiet",
                 "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert any(b in err for b in test_hub.step_branches), err
    assert not (tmp_path / "x").exists()


@pytest.mark.e2e
def test_missing_repo_is_a_clear_error(test_hub, tmp_path, capsys):
    code = main(["nobody/no-such-model", "--output", str(tmp_path / "x"), "--quiet", "--cache-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "nobody/no-such-model" in err and "token" in err and "Traceback" not in err


@pytest.mark.e2e
def test_dry_run_prints_the_plan_with_shas(test_hub, capsys):
    code = main([test_hub.repo_id, "--revisions", "last:3", "--dry-run", "--json"])
    plan = last_json(capsys.readouterr().out)
    assert code == 0 and plan["revisions"] == test_hub.step_branches[-3:]
    assert plan["shas"] == [test_hub.shas[r] for r in plan["revisions"]]


@pytest.mark.e2e
def test_demo_json(tmp_path):
    proc = hf_bomerge("demo", "--json", "--trials", "8", "--output", str(tmp_path / "demo"), cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = last_json(proc.stdout)
    assert set(summary) == JSON_KEYS
    singles = [summary["baselines"][r] for r in summary["revisions"]]
    assert summary["loss"] < min(singles)  # the demo's promise: better than the best single checkpoint
    assert "better than the best single checkpoint" in proc.stderr
    card = (tmp_path / "demo" / "README.md").read_text()
    assert "Not this run's numbers: a separate benchmark (benchmarks/reproduce.py" in card  # cited, and labelled
    assert "checkpoints of\nthe hf-bomerge demo run: a 231k-parameter GPT-NeoX" in card  # named, not by a hash
    assert Path(summary["source"]).name not in card  # the demo's cache folder is a hash of its build
    assert "pipeline_tag: text-generation" in card and "On the confirm part (" in card


def test_trainer_output_folder_never_opens_its_pickles(trajectory, tmp_path):
    """An HF Trainer output: checkpoint-N subfolders with optimizer.pt and training_args.bin beside the weights."""
    run = tmp_path / "trainer-output"
    marker = tmp_path / "unpickled"
    evil = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()  # a pickle that runs a command if loaded
    for i, step in enumerate(json.loads((trajectory / "trajectory.json").read_text())["revisions"][-3:]):
        folder = run / f"checkpoint-{(i + 1) * 500}"
        shutil.copytree(trajectory / step, folder)
        (folder / "optimizer.pt").write_bytes(evil)
        (folder / "training_args.bin").write_bytes(evil)
    code = main([str(run), "--revisions", "checkpoint-500..", "--method", "ema", "--no-eval",
                 "--output", str(tmp_path / "ema"), "--quiet", "--json", "--cache-dir", str(tmp_path / "cache")])
    assert code == 0 and not marker.exists()
    recipe = (tmp_path / "ema" / "bomerge_recipe.yaml").read_text()
    assert "checkpoint-500" in recipe and "checkpoint-1500" in recipe


def test_local_git_repository_branches_are_revisions(trajectory, tmp_path, capsys):
    from testhub import make_git_repo

    steps = json.loads((trajectory / "trajectory.json").read_text())["revisions"][-2:]
    branches = {s: {p.name: p for p in (trajectory / s).iterdir() if p.is_file()} for s in steps}
    shas = make_git_repo(tmp_path / "repo", branches, lfs=False)
    code = main([str(tmp_path / "repo"), "--revisions", ",".join(reversed(steps)), "--weights", "0.25,0.75",
                 "--no-eval", "--output", str(tmp_path / "out"), "--quiet", "--json", "--cache-dir", str(tmp_path / "c")])
    summary = last_json(capsys.readouterr().out)
    assert code == 0 and summary["revisions"] == steps and summary["shas"] == [shas[s] for s in steps]
    assert summary["weights"] == [0.25, 0.75]


@pytest.mark.parametrize("field", ["weights", "shas"])
def test_a_malformed_recipe_is_one_message_naming_the_field_exit_2_nothing_written(trajectory, tmp_path, field):
    """`weights: abc` was a ValueError traceback; a sha `--output=FILE` reached git (the old `git archive` made FILE)."""
    import yaml
    from testhub import make_git_repo

    steps = json.loads((trajectory / "trajectory.json").read_text())["revisions"][-2:]
    shas = make_git_repo(tmp_path / "repo", {s: {p.name: p for p in (trajectory / s).iterdir() if p.is_file()}
                                             for s in steps}, lfs=False)
    planted = tmp_path / "planted"
    pins = [f"--output={planted}", shas[steps[1]]] if field == "shas" else [shas[s] for s in steps]
    recipe = {"source": str(tmp_path / "repo"), "source_kind": "git",
              "weights": "abc" if field == "weights" else [0.5, 0.5],
              "revisions": [{"name": s, "sha": pin} for s, pin in zip(steps, pins)]}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(recipe))
    proc = hf_bomerge("recipe", str(tmp_path / "bad.yaml"), "--output", str(tmp_path / "out"), cache=tmp_path / "c")
    key = "revisions" if field == "shas" else "weights"
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"hf-bomerge: error: Cannot read the recipe {tmp_path / 'bad.yaml'}: `{key}` must be")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not planted.exists()
