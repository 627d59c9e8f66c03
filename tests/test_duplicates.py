"""Revisions serving identical weights, found from content ids before any download (`hf_bomerge.duplicates`):
merged once under the latest name, named in a warning, `--json`, the recipe, the card and `--dry-run`; a
revision sharing some shards is named with them and kept; `--on-duplicate error` refuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from testhub import make_git_repo

from hf_bomerge.cli import main
from hf_bomerge.duplicates import Duplicates, find
from hf_bomerge.errors import DuplicateError
from hf_bomerge.result import JSON_KEYS, SCHEMA, MergeResult


@pytest.fixture(autouse=True)
def this_trees_card_template(monkeypatch):
    """The card template of this tree (an editable install may map hf_bomerge.model_cards to another checkout)."""
    from importlib import resources

    here, real = Path(__file__).resolve().parents[1] / "model_cards", resources.files
    monkeypatch.setattr(resources, "files", lambda pkg: here if pkg == "hf_bomerge.model_cards" else real(pkg))


def test_find_groups_identical_payloads_and_names_shared_shards():
    ids = [{"a": "1", "b": "2"}, {"a": "1", "b": "3"}, {"a": "1", "b": "2"}, {"x": "9"}]
    found = find(ids, ["step1", "step2", "step3", "step4"])
    assert found.identical == {"step3": ["step1"]}  # the latest name is kept
    assert found.partial == [{"revisions": ["step2", "step3"], "shards": ["a"]}]
    assert "step1 and step3 serve identical weights" in found.sentences()[0]
    assert not find([{"a": "1"}, {"a": "2"}], ["s1", "s2"])


def test_the_result_records_them_in_json_since_schema_3():
    dup = Duplicates({"step3": ["step1"]})
    r = MergeResult("org/m", ["step2", "step3"], ["a" * 40, "b" * 40], [0.5, 0.5], duplicates=dup.as_dict())
    assert r.duplicates == dup and SCHEMA == 4 and JSON_KEYS[-1] == "duplicates"
    assert r.summary()["duplicates"] == {"identical": {"step3": ["step1"]}, "partial": []}
    assert r.recipe().as_dict()["duplicates"]["identical"] == {"step3": ["step1"]}


@pytest.fixture()
def dup_folder(source: Path) -> Path:
    """The 3-revision folder plus step610, a copy of step600 (identical weights under a later name)."""
    latest = sorted(p.name for p in source.iterdir())[-1]
    shutil.copytree(source / latest, source / "step610")
    return source


def _run(args, capsys):
    code = main([*args, "--quiet", "--json"])
    out, err = capsys.readouterr()
    return code, out, err


def _check_written(out: str, err: str, output: Path, dropped: str, kept: str, n: int) -> None:
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["schema"] == 4 and summary["duplicates"]["identical"] == {kept: [dropped]}
    assert dropped not in summary["revisions"] and len(summary["revisions"]) == n
    assert f"{dropped} and {kept} serve identical weights" in err  # the warning (and the summary)
    recipe = yaml.safe_load((output / "bomerge_recipe.yaml").read_text())
    assert recipe["duplicates"]["identical"] == {kept: [dropped]}
    assert f"{dropped} and {kept} serve identical weights" in (output / "README.md").read_text()


def test_a_folder_duplicate_is_merged_once_and_recorded(dup_folder, tmp_path, capsys):
    names = sorted(p.name for p in dup_folder.iterdir())
    code, out, err = _run([str(dup_folder), "--revisions", ",".join(names), "--method", "sma", "--no-eval",
                           "--output", str(tmp_path / "out")], capsys)
    assert code == 0, err
    _check_written(out, err, tmp_path / "out", names[-2], "step610", len(names) - 1)


def test_on_duplicate_error_exits_2_naming_them(dup_folder, tmp_path, capsys):
    names = sorted(p.name for p in dup_folder.iterdir())
    code, _, err = _run([str(dup_folder), "--revisions", ",".join(names), "--method", "sma", "--no-eval",
                         "--on-duplicate", "error", "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and f"{names[-2]} and step610 serve identical weights" in err and "--on-duplicate" in err
    assert not (tmp_path / "out").exists()


def test_dry_run_shows_them(dup_folder, capsys):
    names = sorted(p.name for p in dup_folder.iterdir())
    code = main([str(dup_folder), "--revisions", ",".join(names), "--method", "sma", "--no-eval", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and f"duplicate {names[-2]} and step610 serve identical weights" in out
    assert f"would merge {len(names) - 1} revisions" in out


def test_a_thinned_range_keeps_distinct_checkpoints(dup_folder, capsys):
    """--max-checkpoints counts distinct payloads: the duplicate is left out before the range is thinned, so a
    range of 4 names serving 3 payloads is not thinned to 3 of which two are the same bytes."""
    names = sorted(p.name for p in dup_folder.iterdir())  # 3 revisions + step610, a copy of the latest
    code = main([str(dup_folder), "--revisions", f"{names[0]}..step610", "--max-checkpoints", "3", "--method",
                 "sma", "--no-eval", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and "would merge 3 revisions" in out and "kept 3 of" not in out, out
    assert f"duplicate {names[-2]} and step610 serve identical weights" in out


def test_fewer_than_two_distinct_payloads_is_an_error(source, tmp_path, capsys):
    only = sorted(p.name for p in source.iterdir())[-1]
    shutil.copytree(source / only, tmp_path / "two" / "step1")
    shutil.copytree(source / only, tmp_path / "two" / "step2")
    code, _, err = _run([str(tmp_path / "two"), "--revisions", "step1,step2", "--method", "sma", "--no-eval",
                         "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and "at least 2" in err


def _files(folder: Path) -> dict:
    return {p.name: p for p in folder.iterdir() if p.is_file()}


def test_a_git_duplicate_is_found_from_blob_ids(source, tmp_path, capsys):
    steps = sorted(p.name for p in source.iterdir())
    branches = {s: _files(source / s) for s in steps} | {"step610": _files(source / steps[-1])}
    make_git_repo(tmp_path / "repo", branches, lfs=False)
    code, out, err = _run([str(tmp_path / "repo"), "--revisions", ",".join([*steps, "step610"]), "--method", "sma",
                           "--no-eval", "--output", str(tmp_path / "out")], capsys)
    assert code == 0, err
    _check_written(out, err, tmp_path / "out", steps[-1], "step610", len(steps))


def _sharded(folder: Path, out: Path) -> dict:
    """`folder`'s weights as two safetensors shards and their index (plus config and tokenizer)."""
    import torch
    from safetensors.torch import save_file

    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    keys = sorted(state)
    out.mkdir(parents=True)
    half = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
            "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for shard, names in half.items():
        save_file({k: state[k].contiguous() for k in names}, str(out / shard))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: s for s, names in half.items() for k in names}}))
    files = {p.name: p for p in folder.iterdir() if p.suffix == ".json"}
    return files | {p.name: p for p in out.iterdir()}


@pytest.mark.e2e
def test_hub_duplicates_from_the_tree_listing_nothing_of_the_dropped_downloaded(test_hub, tmp_path, capsys):
    from huggingface_hub import constants

    steps = test_hub.step_branches[-3:]
    t = test_hub.trajectory
    a, b, c = (_sharded(t / s, tmp_path / "shards" / s) for s in steps)
    partial = {**b, "model-00001-of-00002.safetensors": c["model-00001-of-00002.safetensors"]}
    repo = "dups/sharded"
    shas = test_hub.add_model_repo(repo, {steps[0]: a, steps[1]: partial, steps[2]: c, "step9990": c})
    code, out, err = _run([repo, "--revisions", ",".join([*steps, "step9990"]), "--method", "sma", "--no-eval",
                           "--output", str(tmp_path / "out")], capsys)
    assert code == 0, err
    _check_written(out, err, tmp_path / "out", steps[2], "step9990", 3)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["duplicates"]["partial"] == [{"revisions": [steps[1], "step9990"],
                                                 "shards": ["model-00001-of-00002.safetensors"]}]
    assert f"{steps[1]} and step9990 share model-00001-of-00002.safetensors" in err
    cache = Path(constants.HF_HUB_CACHE) / "models--dups--sharded" / "snapshots"
    assert (cache / shas["step9990"]).is_dir() and not (cache / shas[steps[2]]).exists()
    code, _, err = _run([repo, "--revisions", ",".join([*steps, "step9990"]), "--method", "sma", "--no-eval",
                         "--on-duplicate", "error", "--output", str(tmp_path / "out2")], capsys)
    assert code == 2 and f"{steps[2]} and step9990 serve identical weights" in err


def test_dedupe_error_class():
    assert issubclass(DuplicateError, Exception)


def test_a_folder_reads_samples_and_confirms_look_alikes_with_a_full_hash(tmp_path):
    """Files equal in every sampled block but one byte apart are not duplicates; equal files are."""
    from hf_bomerge.sources import FolderSource

    data = bytearray(range(256)) * (1 << 14)  # 4 MiB
    changed = bytearray(data)
    changed[len(data) // 2 + 12345] ^= 1  # between the sampled blocks
    for name, payload in (("step1", data), ("step2", changed), ("step3", data)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "pytorch_model.bin").write_bytes(payload)
    source = FolderSource(tmp_path)
    ids = source.all_content_ids(["step1", "step2", "step3"], ["a", "b", "c"])
    assert ids[0] == ids[2] and ids[0] != ids[1]
    assert not ids[0]["pytorch_model.bin"].startswith("sampled:")  # look-alikes were hashed whole
