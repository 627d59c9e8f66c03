"""Every number hf-bomerge reports is the saved model's, checked against independent measurements
(tests/measure.py: a float64 plain-torch merge and transformers' own `labels=` loss in a fresh model):
models that rewrite their own weights (Baichuan2's NormHead), the one rule of what is merged, dtypes, and the
study's identity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import snapshot_download
from measure import heldout_loss, load_state, reference_merge
from safetensors.torch import load_file, save_file

from hf_bomerge import api
from hf_bomerge.cli import main
from hf_bomerge.errors import StudyError
from hf_bomerge.merging import weights as W

pytestmark = pytest.mark.e2e  # the test Hub, subprocess CLIs, real searches or training

ASSETS = Path(__file__).parent / "assets"
NORMHEAD_REPO = "baichuan-like/normhead-tiny"


@pytest.fixture(scope="module")
def normhead_repo(test_hub, trajectory):
    """A remote-code model whose head rewrites its weight on the first eval forward (Baichuan2's NormHead),
    three step branches of the demo trajectory, in the test Hub."""
    config = json.loads((trajectory / "main" / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_normhead.NormHeadForCausalLM"}
    config["architectures"] = ["NormHeadForCausalLM"]
    branches = {}
    for step in test_hub.step_branches[-3:]:
        files = {p.name: p for p in (trajectory / step).iterdir() if p.name.startswith("tokenizer")}
        branches[step] = {**files, "config.json": json.dumps(config, indent=2),
                          "modeling_normhead.py": ASSETS / "normhead" / "modeling_normhead.py",
                          "pytorch_model.bin": trajectory / step / "pytorch_model.bin"}
    test_hub.add_model_repo(NORMHEAD_REPO, branches)
    return NORMHEAD_REPO


def test_a_head_that_rewrites_its_weight_gets_fresh_process_losses(normhead_repo, test_hub, tmp_path, capsys):
    code = main([normhead_repo, "--revisions", "last:3", "--trust-remote-code", "--dataset", test_hub.dataset_id,
                 "--split", "validation", "--trials", "8", "--json", "--quiet", "--output", str(tmp_path / "out"),
                 "--cache-dir", str(tmp_path / "cache")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    folders = [Path(snapshot_download(normhead_repo, revision=sha, cache_dir=tmp_path / "hub")) for sha in summary["shas"]]
    n = len(folders)
    cases = {"merged": summary["weights"], "uniform": W.uniform(n), "ema": W.ema(n, 0.2),
             **{name: W.one_hot(n, i) for i, name in enumerate(summary["revisions"])}}
    reported = {"merged": summary["loss"], **summary["baselines"]}
    measured = {}
    for label, weights in cases.items():
        folder = reference_merge(folders, weights, tmp_path / label)
        measured[label] = heldout_loss(folder, test_hub.dataset_id, "validation", trust_remote_code=True, part="search")
    assert measured == pytest.approx(reported, abs=2e-5)
    saved = heldout_loss(tmp_path / "out", test_hub.dataset_id, "validation", trust_remote_code=True, part="search")
    assert saved == pytest.approx(summary["loss"], abs=2e-5)
    assert len(set(round(v, 4) for v in measured.values())) > 3  # the cases differ: a stale head would show


def test_an_unknown_module_that_rewrites_its_weight_stops_the_search(normhead_repo, test_hub, tmp_path, monkeypatch):
    import hf_bomerge.merging.mergers

    monkeypatch.setattr(hf_bomerge.merging.mergers, "CACHED_TRANSFORMS", {})  # as if NormHead were not in the table
    with pytest.raises(hf_bomerge.merging.mergers.RewrittenParameterError, match=r"NormHead \(lm_head\).*lm_head\.weight"):
        api.search(normhead_repo, "last:2", trust_remote_code=True, dataset=test_hub.dataset_id, split="validation",
                   trials=3, cache_dir=tmp_path / "cache", progress=False, max_eval_tokens=2048)


def _write_run(trajectory: Path, steps: list[str], root: Path, convert, extra: bool = False) -> Path:
    """A Trainer-style folder (checkpoint-N subfolders, safetensors) of the demo's `steps`, each tensor
    passed through `convert(name, tensor)`; with `extra`, a float tensor that is no model parameter."""
    for i, step in enumerate(steps):
        folder = root / f"checkpoint-{(i + 1) * 100}"
        folder.mkdir(parents=True)
        state = {k: convert(k, v) for k, v in load_state(trajectory / step).items()
                 if not k.endswith(("masked_bias", "inv_freq", "attention.bias"))}
        if extra:
            state["gpt_neox.extra_scale"] = torch.full((4,), float(i + 1))
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        for f in (trajectory / step).iterdir():
            if f.suffix == ".json":
                (folder / f.name).write_bytes(f.read_bytes())
    return root


def test_search_in_a_cheaper_dtype_reports_the_saved_dtype(trajectory, tmp_path):
    """fp32 checkpoints searched in bfloat16: the merge and every baseline are scored again in float32."""
    run = _write_run(trajectory, ["step500", "step550", "step600"], tmp_path / "run", lambda k, v: v.float())
    held = str(trajectory / "heldout" / "validation.jsonl")
    result = api.search(str(run), "last:3", dataset=held, eval_dtype="bfloat16", trials=7, progress=False,
                        cache_dir=tmp_path / "cache", max_eval_tokens=4096)
    assert result.eval_dtype == "float32"
    out = result.save_pretrained(tmp_path / "out")
    assert heldout_loss(out, held, max_tokens=4096, part="search") == pytest.approx(result.loss, abs=2e-5)
    assert heldout_loss(out, held, max_tokens=4096, part="confirm") == pytest.approx(result.confirm["loss"], abs=2e-5)
    folders = [run / f"checkpoint-{i}" for i in (100, 200, 300)]
    for i, name in enumerate(result.revisions):
        single = reference_merge(folders, W.one_hot(3, i), tmp_path / name)
        assert heldout_loss(single, held, max_tokens=4096, part="search") == pytest.approx(result.baselines[name], abs=2e-5)
    # The control: the same saved model scored in bfloat16 is another number, outside the tolerance above.
    assert abs(heldout_loss(out, held, max_tokens=4096, dtype=torch.bfloat16, part="search") - result.loss) > 2e-5


def test_mixed_dtypes_and_a_float_buffer_follow_the_one_merge_rule(trajectory, tmp_path):
    """LayerNorms in float32, the rest in float16, and a float tensor the model does not have: each tensor is
    saved in its own dtype, the stray tensor is copied from the latest revision (not averaged) in the trials and
    in the export alike, and the reported loss is the saved model's."""
    def convert(name, tensor):
        return tensor.float() if "layernorm" in name or "norm" in name.split(".")[-2] else tensor.half()

    run = _write_run(trajectory, ["step450", "step500", "step600"], tmp_path / "run", convert, extra=True)
    held = str(trajectory / "heldout" / "validation.jsonl")
    weights = [0.2, 0.3, 0.5]
    result = api.merge(str(run), "last:3", weights=weights, dataset=held, progress=False,
                       cache_dir=tmp_path / "cache", max_eval_tokens=4096)
    assert "gpt_neox.extra_scale" in result.copied
    out = result.save_pretrained(tmp_path / "out")
    saved, latest = load_file(out / "model.safetensors"), load_file(run / "checkpoint-300" / "model.safetensors")
    assert {k: v.dtype for k, v in saved.items()} == {k: v.dtype for k, v in latest.items()}
    assert torch.equal(saved["gpt_neox.extra_scale"], latest["gpt_neox.extra_scale"])  # 3.0, not the average 2.3
    folders = [run / f"checkpoint-{i}" for i in (100, 200, 300)]
    reference = load_state(reference_merge(folders, weights, tmp_path / "ref", copied=("gpt_neox.extra_scale",)))
    assert all(torch.allclose(saved[k].double(), reference[k].double(), rtol=0, atol=1e-3 if v.dtype == torch.float16
                              else 1e-6) for k, v in saved.items())
    assert heldout_loss(out, held, max_tokens=4096) == pytest.approx(result.loss, abs=2e-5)
    assert "copied" in (out / "bomerge_recipe.yaml").read_text()


def test_float64_checkpoints_merge_in_float64(trajectory, tmp_path):
    run = _write_run(trajectory, ["step500", "step600"], tmp_path / "run", lambda k, v: v.double())
    result = api.merge(str(run), "last:2", weights=[0.25, 0.75], evaluate=False, progress=False,
                       cache_dir=tmp_path / "cache")
    out = result.save_pretrained(tmp_path / "out")
    saved = load_file(out / "model.safetensors")
    folders = [run / "checkpoint-100", run / "checkpoint-200"]
    reference = load_state(reference_merge(folders, [0.25, 0.75], tmp_path / "ref"))
    assert all(v.dtype == torch.float64 for v in saved.values())
    assert all(torch.allclose(saved[k], reference[k], rtol=1e-14, atol=1e-15) for k in saved)


def test_resuming_with_other_evaluation_inputs_is_refused_by_name(trajectory, tmp_path):
    held = tmp_path / "held.jsonl"
    held.write_text((trajectory / "heldout" / "validation.jsonl").read_text())
    common = dict(dataset=str(held), trials=6, progress=False, cache_dir=tmp_path / "cache",
                  storage=f"sqlite:///{tmp_path / 'studies.db'}", study_name="fixed-name", max_eval_tokens=2048)
    first = api.search(str(trajectory), "last:3", **common)
    with pytest.raises(StudyError, match="block_size"):
        api.search(str(trajectory), "last:3", block_size=64, **common)
    with pytest.raises(StudyError, match="eval_dtype"):
        api.search(str(trajectory), "last:3", eval_dtype="bfloat16", **common)
    # An edited held-out file is tokenized again (the cache is keyed by content), so the study sees new data.
    rows = held.read_text().splitlines()
    held.write_text("\n".join(reversed(rows)) + "\n")
    with pytest.raises(StudyError, match="data"):
        api.search(str(trajectory), "last:3", **common)
    held.write_text("\n".join(rows) + "\n")
    again = api.search(str(trajectory), "last:3", **common)  # the original inputs resume the same study
    assert again.study == first.study and again.loss == first.loss
