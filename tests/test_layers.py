"""Depth-wise weights (`--layer-groups G`): the grouping rule, the layered space, one arithmetic path for trials
and export, and a recipe that rebuilds the layered merge bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
from test_engine import _read_output, _trajectory
from transformers import AutoModelForCausalLM

from hf_bomerge.errors import BOMergeError, StudyError, WeightsError
from hf_bomerge.merging import engine
from hf_bomerge.merging.layers import LayerGroups, LayerWeights
from hf_bomerge.merging.mergers import ResidentMerger, StreamedMerger
from hf_bomerge.merging.writer import export_merge
from hf_bomerge.reading.checkpoints import CheckpointSet
from hf_bomerge.searching.study import run_search
from hf_bomerge.searching.weight_spaces import SIMPLEX_FLOOR, Layered, make_space
from hf_bomerge.specs import SearchSpec

LLAMA = ["model.embed_tokens.weight", *(f"model.layers.{i}.self_attn.q_proj.weight" for i in range(6)),
         "model.norm.weight", "lm_head.weight"]


def test_tensors_fall_into_embeddings_consecutive_block_groups_and_head():
    rule = LayerGroups.from_names(3, LLAMA)
    assert rule == LayerGroups(3, 6)
    assert rule.names() == ["embeddings", "blocks 0-1", "blocks 2-3", "blocks 4-5", "head"]
    assert [rule.group_of(n) for n in LLAMA] == [0, 1, 1, 2, 2, 3, 3, 4, 4]  # the final norm goes with the head
    gpt2 = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight",
            "transformer.h.1.mlp.c_fc.weight", "transformer.ln_f.weight"]
    assert [LayerGroups.from_names(1, gpt2).group_of(n) for n in gpt2] == [0, 0, 1, 1, 2]
    neox = ["gpt_neox.embed_in.weight", "gpt_neox.layers.0.mlp.dense_4h_to_h.weight", "embed_out.weight"]
    assert [LayerGroups(1, 1).group_of(n) for n in neox] == [0, 1, 2]  # embed_out is the head, not an embedding


def test_a_grouping_the_model_cannot_have_is_refused_with_the_fix():
    with pytest.raises(WeightsError, match="between 1 and the model's 6 transformer blocks, got 7"):
        LayerGroups.from_names(7, LLAMA)
    with pytest.raises(WeightsError, match="no tensor name holds a block index"):
        LayerGroups.from_names(1, ["wte.weight", "lm_head.weight"])
    with pytest.raises(StudyError, match="cannot combine with --search family"):
        SearchSpec(space="family", layer_groups=2)
    with pytest.raises(StudyError, match="needs --layer-groups"):
        make_space("layered", 4)
    with pytest.raises(StudyError, match="at most 8 revisions"):
        Layered(9, groups=LayerGroups(1, 2))


def test_every_global_baseline_is_in_the_layered_space_and_depth_interpolates():
    space = Layered(4, groups=LayerGroups(2, 4), sizes=[10, 20, 20, 5])
    simplex = make_space("simplex", 4)
    labels = ["a", "b", "c", "d"]
    assert [label for label, _ in space.seeds(labels)] == [label for label, _ in simplex.seeds(labels)]
    for label, w in space.seeds(labels):
        params = space.params_for(w)
        assert params is not None, label
        layered = space.weights(params)
        assert all(v == pytest.approx(w, abs=1e-12) for v in layered.vectors) and layered.is_global()
        assert space.plain(layered) == pytest.approx(w, abs=1e-12)
    params = {**{f"s{i}": 1.0 if i == 0 else SIMPLEX_FLOOR for i in range(4)},
              **{f"d{i}": 1.0 if i == 3 else SIMPLEX_FLOOR for i in range(4)}}
    layered = space.weights(params)
    want = {"embeddings": [1.0, 0.0, 0.0, 0.0], "blocks 0-1": [2 / 3, 0.0, 0.0, 1 / 3],
            "blocks 2-3": [1 / 3, 0.0, 0.0, 2 / 3], "head": [0.0, 0.0, 0.0, 1.0]}
    assert {k: pytest.approx(v, abs=1e-15) for k, v in layered.as_dict().items()} == want
    assert layered.vectors[0] == (1.0, 0.0, 0.0, 0.0) and layered.vectors[-1] == (0.0, 0.0, 0.0, 1.0)
    # `weights` of a layered merge: the groups' mean weighted by their parameter counts
    assert space.plain(layered) == pytest.approx([(10 + 20 * 2 / 3 + 20 / 3) / 55, 0, 0, (20 / 3 + 40 / 3 + 5) / 55])
    assert len(space.param_names()) == 8  # 2·N whatever G


def test_the_study_records_each_trials_group_weights_and_their_mean():
    space = Layered(3, groups=LayerGroups(1, 2), sizes=[1, 2, 1])
    seen = []

    def evaluate(w):
        seen.append(w)
        return sum((v[2] - 0.2 * g) ** 2 for g, v in enumerate(w.vectors))  # the head wants the latest more

    outcome = run_search(evaluate, space, ["a", "b", "c"], trials=9, storage=optuna.storages.InMemoryStorage(),
                         study_name="layers", inputs={}, progress=False,
                         sampler=lambda seed, n: optuna.samplers.RandomSampler(seed=0))
    assert all(isinstance(w, LayerWeights) for w in seen)
    for trial in outcome.trials:
        assert list(trial.layer_weights) == ["embeddings", "blocks 0-1", "head"]
        assert trial.weights == pytest.approx(LayerWeights.from_dict(space.groups, trial.layer_weights).mean([1, 2, 1]))
    assert set(outcome.baselines) == {"a", "b", "c", "uniform", "ema"}
    assert outcome.baselines["uniform"] == pytest.approx(sum((1 / 3 - 0.2 * g) ** 2 for g in range(3)))


def _layered(groups: int, n: int) -> LayerWeights:
    """A layered assignment with a different vector in every group (not an interpolation: any map works)."""
    rule = LayerGroups(groups, 2)
    vectors = [[(i + 1.0) * (g + 1.0) ** (i % 2) for i in range(n)] for g in range(len(rule))]
    return LayerWeights(rule, tuple(tuple(v / sum(vec) for v in vec) for vec in vectors))


@pytest.mark.parametrize("chunk", [engine.CHUNK, 1000])
@pytest.mark.parametrize("n, groups", [(3, 2), (2, 1)], ids=["n3-G2", "pair-G1"])
def test_layered_trial_merge_matches_the_export_bit_for_bit(tmp_path, n, groups, chunk, monkeypatch):
    """The resident trial merge, the streamed one and the export give the same bits for a layered merge, and
    every tensor is exactly the global merge with its group's vector."""
    monkeypatch.setattr(engine, "CHUNK", chunk)
    folders, states = _trajectory(tmp_path, ["bin", "safetensors", "bin"][-n:])
    ckpts = CheckpointSet(folders)
    layered = _layered(groups, n)
    model = AutoModelForCausalLM.from_pretrained(folders[-1], dtype=torch.float32)
    ResidentMerger(model, ckpts).apply(layered)
    export_merge(ckpts, layered, tmp_path / "out")
    out = _read_output(tmp_path / "out")
    stored = {"lm_head.weight": "embed_out.weight"}
    params = dict(model.named_parameters())
    for name, p in params.items():
        assert torch.equal(p.detach(), out[stored.get(name, name)].float()), name
    streamed = AutoModelForCausalLM.from_pretrained(folders[-1], dtype=torch.float32)
    StreamedMerger(streamed, CheckpointSet(folders)).apply(layered)
    for name, p in streamed.named_parameters():
        assert torch.equal(p.detach(), params[name].detach()), name
    for g, vector in enumerate(layered.vectors):  # per tensor: the global merge with its group's vector
        export_merge(CheckpointSet(folders), list(vector), tmp_path / f"global{g}")
        whole = _read_output(tmp_path / f"global{g}")
        names = [k for k in out if ckpts.is_merged(k) and layered.rule.group_of(k) == g]
        assert names, g
        assert all(torch.equal(out[k], whole[k]) for k in names)
    assert len({tuple(v) for v in layered.vectors}) == len(layered.vectors)  # the groups really differ


def test_layered_merge_on_a_half_precision_model_matches_per_tensor_global_merges(tmp_path):
    """The resident merger's other paths (a bf16 model accumulates per tensor in float32) apply the group vectors."""
    folders, _ = _trajectory(tmp_path, ["bin"] * 3)
    layered = _layered(2, 3)
    model = AutoModelForCausalLM.from_pretrained(folders[-1], dtype=torch.bfloat16)
    ResidentMerger(model, CheckpointSet(folders)).apply(layered)
    export_merge(CheckpointSet(folders), layered, tmp_path / "out")
    out = _read_output(tmp_path / "out")
    stored = {"lm_head.weight": "embed_out.weight"}
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), out[stored.get(name, name)].to(torch.bfloat16)), name


def _cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_bomerge.cli", *args, "--cache-dir", str(cache)],
                          capture_output=True, text=True, timeout=900)


@pytest.mark.e2e
def test_layered_search_json_card_and_recipe_rebuild_it_bit_for_bit(trajectory, tmp_path):
    cache, storage = tmp_path / "cache", f"sqlite:///{tmp_path / 'studies.db'}"
    proc = _cli("demo", "--layer-groups", "2", "--trials", "8", "--output", str(tmp_path / "merged"),
                "--storage", storage, "--json", "--quiet", cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["schema"] == 4
    groups = summary["layer_weights"]
    assert list(groups) == ["embeddings", "block 0", "block 1", "head"]
    assert all(abs(sum(v) - 1.0) < 1e-9 and len(v) == 4 for v in groups.values())
    merged = tmp_path / "merged"
    recipe = (merged / "bomerge_recipe.yaml").read_text()
    assert "layer_weights:" in recipe and "layer_groups:" in recipe
    card = (merged / "README.md").read_text()
    assert "## Depth-wise weights (4 groups)" in card and "(bomerge_layers.png)" in card
    assert (merged / "bomerge_layers.png").read_bytes()[:4] == b"\x89PNG"
    assert "mean over depth groups" in proc.stderr
    again = _cli("recipe", str(merged / "bomerge_recipe.yaml"), "--output", str(tmp_path / "again"), "--quiet",
                 cache=cache)
    assert again.returncode == 0, again.stderr[-3000:]
    exported = _cli("export", "--storage", storage, "--output", str(tmp_path / "exported"), "--quiet", cache=cache)
    assert exported.returncode == 0, exported.stderr[-3000:]
    original = (merged / "model.safetensors").read_bytes()
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == original
    assert (tmp_path / "exported" / "model.safetensors").read_bytes() == original
    # and the layered merge is not a global one: some tensor differs from the mean-weight merge
    flat = _cli("recipe", str(_global_recipe(merged, tmp_path)), "--output", str(tmp_path / "flat"), "--quiet",
                cache=cache)
    assert flat.returncode == 0, flat.stderr[-3000:]
    assert (tmp_path / "flat" / "model.safetensors").read_bytes() != original


def _global_recipe(merged: Path, tmp_path: Path) -> Path:
    import yaml

    recipe = yaml.safe_load((merged / "bomerge_recipe.yaml").read_text())
    del recipe["layer_weights"], recipe["layer_groups"]
    path = tmp_path / "global.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_recipe_for_another_model_is_refused(tmp_path):
    from types import SimpleNamespace

    from hf_bomerge.recorded import _layered

    folders, _ = _trajectory(tmp_path, ["bin", "bin"])
    prep = SimpleNamespace(ckpts=CheckpointSet(folders), names=["step100", "step200"])
    rule = LayerGroups(1, 2)
    assert _layered(prep, {n: [0.25, 0.75] for n in rule.names()}, rule.as_dict()) == (
        {n: [0.25, 0.75] for n in rule.names()}, rule.as_dict())
    other = LayerGroups(1, 5)  # the test model has 2 blocks
    with pytest.raises(BOMergeError, match="groups 5 transformer blocks, but these checkpoints have 2"):
        _layered(prep, {n: [0.5, 0.5] for n in other.names()}, other.as_dict())
    with pytest.raises(BOMergeError, match="pattern\\) differs"):
        _layered(prep, {n: [0.5, 0.5] for n in rule.names()}, {**rule.as_dict(), "blocks": r"layer_(\d+)"})
    with pytest.raises(WeightsError, match="names the groups"):
        _layered(prep, {"all": [0.5, 0.5]}, rule.as_dict())
