"""Every output holds the merge as a mergekit config (`mergekit_config.yml`), and the real `mergekit-yaml` (0.1.5,
the test extra) rebuilds the same tensors from it: a folder source, a Hub source through the test Hub, a layered
merge. Each tensor of both outputs is compared bit for bit with safetensors.

The checkpoints are the demo trajectory's with the output layer named `embed_out.weight`, as real Pythia step
files name it: mergekit 0.1.5's GPT-NeoX definition reads only that name (transformers 5 saves `lm_head.weight`,
which mergekit refuses: "Tensor embed_out.weight required but not present")."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_bomerge.publish.mergekit import CONFIG_FILE, NOT_EXACT, weight_rules
from hf_bomerge.reading.checkpoints import CheckpointSet

MERGEKIT_YAML = Path(sys.executable).parent / "mergekit-yaml"
BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _pythia_named(trajectory: Path, steps: list[str], root: Path) -> Path:
    """Copies of `steps` whose .bin names the output layer as Pythia's files do (`embed_out.weight`)."""
    for step in steps:
        shutil.copytree(trajectory / step, root / step)
        path = root / step / "pytorch_model.bin"
        state = torch.load(path, weights_only=True)
        torch.save({("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in state.items()}, path)
    return root


def _cli(*args: str, cache: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "hf_bomerge.cli", *args, "--no-eval", "--quiet", "--cache-dir",
                           str(cache)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _mergekit(output: Path, rebuilt: Path) -> None:
    proc = subprocess.run([str(MERGEKIT_YAML), str(output / CONFIG_FILE), str(rebuilt)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _differences(ours: Path, theirs: Path) -> dict[str, tuple]:
    """{tensor: (dtypes, or (differing elements, elements, largest difference in units of the last place))} of
    every tensor the two folders' safetensors do not hold bit for bit alike."""
    a, b = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert set(a) == set(b)
    out = {}
    for name in a:
        x, y = a[name], b[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            out[name] = (str(x.dtype), str(y.dtype))
            continue
        bits = BITS[x.element_size()]
        xb, yb = x.reshape(-1).view(bits).long(), y.reshape(-1).view(bits).long()
        if not torch.equal(xb, yb):
            out[name] = (int((xb != yb).sum()), x.numel(), int((xb - yb).abs().max()))
    return out


def _listed(config: str) -> set[str]:
    """The tensors the config's header says mergekit writes differently."""
    lines = config.split(NOT_EXACT, 1)[1].splitlines()[1:] if NOT_EXACT in config else []
    return {line[4:].split(":")[0] for line in lines if line.startswith("#   ")}


@pytest.mark.e2e
def test_mergekit_rebuilds_a_folder_merge_bit_for_bit(trajectory, tmp_path):
    steps = json.loads((trajectory / "trajectory.json").read_text())["revisions"][-3:]
    run = _pythia_named(trajectory, steps, tmp_path / "run")
    _cli(str(run), "--revisions", ",".join(steps), "--weights", "0.2,0.3,0.5", "--output", str(tmp_path / "merged"),
         cache=tmp_path / "cache")
    text = (tmp_path / "merged" / CONFIG_FILE).read_text()
    config = yaml.safe_load(text)
    assert config["merge_method"] == "linear" and config["parameters"] == {"normalize": False}
    assert "dtype" not in config and "out_dtype" not in config  # every tensor keeps its dtype, as ours do
    assert [m["model"] for m in config["models"]] == [str(run / s) for s in steps]
    _mergekit(tmp_path / "merged", tmp_path / "rebuilt")
    # every tensor, the copied buffers (inv_freq, masked_bias = -inf) and the bool masks included
    assert _differences(tmp_path / "merged", tmp_path / "rebuilt") == {}
    assert NOT_EXACT not in text


@pytest.mark.e2e
def test_a_git_merge_names_the_folders_its_commits_were_extracted_into(trajectory, tmp_path):
    from testhub import make_git_repo

    steps = json.loads((trajectory / "trajectory.json").read_text())["revisions"][-3:]
    run = _pythia_named(trajectory, steps, tmp_path / "run")
    shas = make_git_repo(tmp_path / "repo", {s: {p.name: p for p in (run / s).iterdir()} for s in steps}, lfs=False)
    _cli(str(tmp_path / "repo"), "--revisions", ",".join(steps), "--weights", "0.1,0.3,0.6", "--output",
         str(tmp_path / "merged"), cache=tmp_path / "cache")
    text = (tmp_path / "merged" / CONFIG_FILE).read_text()
    folders = [Path(m["model"]) for m in yaml.safe_load(text)["models"]]
    assert [f.name for f in folders] == [shas[s] for s in steps]  # one extracted folder per commit, in the cache
    assert all(f.is_relative_to(tmp_path / "cache") for f in folders)
    assert all((f / "pytorch_model.bin").read_bytes() == (run / s / "pytorch_model.bin").read_bytes()
               for f, s in zip(folders, steps))
    assert "extracted" in text.split("merge_method:")[0]  # the header says where they come from
    _mergekit(tmp_path / "merged", tmp_path / "rebuilt")
    assert _differences(tmp_path / "merged", tmp_path / "rebuilt") == {}


@pytest.mark.e2e
def test_mergekit_downloads_a_hub_merge_by_its_commits_and_rebuilds_it(test_hub, trajectory, tmp_path):
    steps = test_hub.step_branches[-2:]
    run = _pythia_named(trajectory, steps, tmp_path / "run")
    repo = "pythia-named/pythia-tiny"
    shas = test_hub.add_model_repo(repo, {s: {p.name: p for p in (run / s).iterdir()} for s in steps})
    _cli(repo, "--revisions", ",".join(steps), "--weights", "0.37,0.63", "--output", str(tmp_path / "merged"),
         cache=tmp_path / "cache")
    config = yaml.safe_load((tmp_path / "merged" / CONFIG_FILE).read_text())
    assert [m["model"] for m in config["models"]] == [f"{repo}@{shas[s]}" for s in steps]
    _mergekit(tmp_path / "merged", tmp_path / "rebuilt")  # through HF_ENDPOINT, the test Hub
    differ = _differences(tmp_path / "merged", tmp_path / "rebuilt")
    # Two checkpoints are merged as θ₀ + w₁·(θ₁ − θ₀) in float32, mergekit sums w₀·θ₀ + w₁·θ₁: the float32 sums
    # can fall on either side of a float16 rounding boundary. Measured here: 9 of the 231,168 weighted elements
    # (in 6 tensors), each 1 unit in the last place of float16; every other element and tensor bit for bit.
    assert all(isinstance(d[0], int) and d[2] == 1 for d in differ.values()), differ
    assert sum(d[0] for d in differ.values()) <= 20, differ
    assert not any("masked_bias" in n or "inv_freq" in n or ".attention.bias" in n for n in differ)


@pytest.mark.e2e
def test_mergekit_rebuilds_a_layered_merge_in_another_dtype(trajectory, tmp_path):
    steps = json.loads((trajectory / "trajectory.json").read_text())["revisions"][-3:]
    run = _pythia_named(trajectory, steps, tmp_path / "run")
    cache = tmp_path / "cache"
    _cli(str(run), "--revisions", ",".join(steps), "--weights", "0.2,0.3,0.5", "--output", str(tmp_path / "flat"),
         cache=cache)
    recipe = yaml.safe_load((tmp_path / "flat" / "bomerge_recipe.yaml").read_text())
    recipe.update(dtype="bfloat16", layer_groups={"groups": 2, "layers": 2}, layer_weights={
        "embeddings": [0.5, 0.3, 0.2], "block 0": [0.1, 0.2, 0.7], "block 1": [0.25, 0.25, 0.5], "head": [0.6, 0.1, 0.3]})
    (tmp_path / "layered.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    subprocess.run([sys.executable, "-m", "hf_bomerge.cli", "recipe", str(tmp_path / "layered.yaml"), "--output",
                    str(tmp_path / "merged"), "--quiet", "--cache-dir", str(cache)], check=True, timeout=600)
    text = (tmp_path / "merged" / CONFIG_FILE).read_text()
    config = yaml.safe_load(text)
    assert (config["dtype"], config["out_dtype"]) == ("float32", "bfloat16")  # one rounding, as ours
    _mergekit(tmp_path / "merged", tmp_path / "rebuilt")
    differ = _differences(tmp_path / "merged", tmp_path / "rebuilt")
    # the weighted tensors bit for bit, each with its group's weights; what mergekit casts to bfloat16 (the buffers
    # hf-bomerge copies in their own dtype) is what the header lists, and nothing else
    assert set(differ) == _listed(text) == {f"gpt_neox.layers.{i}.attention.{b}" for i in (0, 1)
                                            for b in ("bias", "masked_bias", "rotary_emb.inv_freq")}
    assert all(isinstance(d[0], str) for d in differ.values())  # a dtype, not a value, differs


def test_each_tensor_gets_its_weights_by_mergekits_own_filter_rule(tmp_path):
    """Names whose natural filters collide (a copied `attn.bias` inside `attn.bias_proj`, `h.1.` beside `h.11.`)
    and a tied `lm_head.weight` (in the head group by its name, merged with the embedding's weights): the rules
    still give every tensor the weights hf-bomerge applies, read back with mergekit's own `evaluate_setting`."""
    from mergekit.config import ConditionalParameter, evaluate_setting

    from hf_bomerge.merging.layers import LayerGroups, LayerWeights

    names = ["wte.weight", *(f"h.{i}.{p}" for i in range(12) for p in ("attn.bias", "attn.bias_proj.weight",
                                                                        "mlp.weight")), "ln_f.weight"]
    for k, step in enumerate(("step1", "step2")):
        (tmp_path / step).mkdir()
        state = {n: torch.full((2,), float(k)) for n in names}
        torch.save({**state, "lm_head.weight": state["wte.weight"]}, tmp_path / step / "pytorch_model.bin")
    ckpts = CheckpointSet([tmp_path / "step1", tmp_path / "step2"], copied=[f"h.{i}.attn.bias" for i in range(12)])
    assert ckpts.aliases == {"lm_head.weight": "wte.weight"}
    rule = LayerGroups(groups=3, layers=12)
    weights = LayerWeights(rule, tuple((0.1 * g, 1 - 0.1 * g) for g in range(len(rule))))
    rules, differ = weight_rules(ckpts, weights)
    assert differ == []
    per_model = [[ConditionalParameter(filter=f, value=v[i]) for f, v in rules] for i in range(2)]  # as the YAML
    for name in [*names, "lm_head.weight"]:
        want = (0.0, 1.0) if name.endswith("attn.bias") else tuple(weights.for_tensor(name.replace("lm_head", "wte")))
        assert tuple(evaluate_setting(name, p, validate=float) for p in per_model) == want, name
