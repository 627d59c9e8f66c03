"""The merge engine: every checkpoint layout found on the Hub, merged exactly, with buffers untouched."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM

from hf_bomerge.errors import CheckpointError
from hf_bomerge.merging import durable, engine
from hf_bomerge.merging.mergers import ResidentMerger
from hf_bomerge.merging.writer import export_merge
from hf_bomerge.reading.checkpoints import CheckpointSet, is_merged

WEIGHTS = [0.2, 0.3, 0.5]
CONFIG = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=16, rotary_pct=0.25, tie_word_embeddings=False)


def _state(seed: int, tie: bool = False) -> tuple[GPTNeoXConfig, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    config = GPTNeoXConfig(**{**CONFIG, "tie_word_embeddings": tie})
    model = GPTNeoXForCausalLM(config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # Stored under the names Pythia's files use (transformers 5 calls it lm_head when loaded).
    state["embed_out.weight"] = state.pop("lm_head.weight")
    return config, state


def _with_legacy_buffers(state: dict, n_layers: int, ctx: int) -> dict:
    """What real Pythia .bin files carry besides parameters."""
    state = dict(state)
    for i in range(n_layers):
        state[f"gpt_neox.layers.{i}.attention.bias"] = torch.tril(torch.ones(ctx, ctx, dtype=torch.bool))[None, None]
        state[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9).half()
        state[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, 2, 2).float() / 2))
    return state


def _write(folder: Path, config, state: dict, layout: str, dtype=torch.float16) -> Path:
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    state = {k: (v.to(dtype) if v.is_floating_point() and is_merged_name(k) else v) for k, v in state.items()}
    if layout == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    elif layout == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    elif layout in ("sharded-safetensors", "sharded-bin"):
        names = sorted(state)
        halves = [names[: len(names) // 2], names[len(names) // 2:]]
        ext = "safetensors" if layout == "sharded-safetensors" else "bin"
        stem = "model" if ext == "safetensors" else "pytorch_model"
        weight_map = {}
        for i, part in enumerate(halves):
            fname = f"{stem}-{i + 1:05d}-of-00002.{ext}"
            shard = {k: state[k].contiguous() for k in part}
            save_file(shard, folder / fname) if ext == "safetensors" else torch.save(shard, folder / fname)
            weight_map.update({k: fname for k in part})
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def is_merged_name(name: str) -> bool:
    return not name.endswith(("masked_bias", "inv_freq", "attention.bias"))


def _trajectory(tmp_path: Path, layouts, dtypes=None, legacy=True) -> tuple[list[Path], list[dict]]:
    folders, states = [], []
    for i, layout in enumerate(layouts):
        config, state = _state(i)
        if legacy:
            state = _with_legacy_buffers(state, CONFIG["num_hidden_layers"], CONFIG["max_position_embeddings"])
        dtype = (dtypes or [torch.float16] * len(layouts))[i]
        folders.append(_write(tmp_path / f"step{(i + 1) * 100}", config, state, layout, dtype))
        states.append({k: (v.to(dtype) if v.is_floating_point() and is_merged_name(k) else v) for k, v in state.items()})
    return folders, states


def _reference(states: list[dict], name: str, weights=WEIGHTS) -> torch.Tensor:
    return sum(w * s[name].double() for w, s in zip(weights, states))


def _read_output(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("layout", ["bin", "safetensors", "sharded-safetensors", "sharded-bin"])
@pytest.mark.parametrize("weights", [WEIGHTS, [0.35, 0.65]], ids=["n3", "pairwise"])
def test_export_is_exact_on_every_layout(tmp_path, layout, weights):
    folders, states = _trajectory(tmp_path, [layout] * len(weights))
    ckpts = CheckpointSet(folders)
    export_merge(ckpts, weights, tmp_path / "out", max_shard_size=20_000)
    out = _read_output(tmp_path / "out")
    assert set(out) == set(states[-1])
    for name, tensor in out.items():
        if is_merged_name(name):
            ref = _reference(states, name, weights)
            assert tensor.dtype == torch.float16
            # fp32 accumulation then one rounding: within half an fp16 ulp of the exact float64 sum
            assert torch.allclose(tensor.double(), ref, rtol=2**-11, atol=2**-24), name
        else:  # buffers: the latest checkpoint's, bit for bit (masked_bias stays -inf, not NaN)
            assert torch.equal(tensor, states[-1][name]), name
    assert torch.isinf(out["gpt_neox.layers.0.attention.masked_bias"]).all()
    assert out["gpt_neox.layers.0.attention.bias"].dtype == torch.bool


def test_sharded_output_loads_with_transformers(tmp_path):
    folders, states = _trajectory(tmp_path, ["bin"] * 3)
    out = tmp_path / "out"
    files = export_merge(CheckpointSet(folders), WEIGHTS, out, max_shard_size=30_000, dtype=torch.float32)
    assert len(files) > 1 and (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _read_output(out).values())
    GPTNeoXConfig(**CONFIG).save_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = _reference(states, "embed_out.weight")
    assert torch.allclose(model.lm_head.weight.double(), ref, atol=1e-6)


def test_mixed_dtypes_merge_in_float32_and_store_the_reference_dtype(tmp_path):
    folders, states = _trajectory(tmp_path, ["safetensors", "bin", "safetensors"],
                                  dtypes=[torch.float32, torch.bfloat16, torch.float16])
    export_merge(CheckpointSet(folders), WEIGHTS, tmp_path / "out")
    out = _read_output(tmp_path / "out")
    t = out["gpt_neox.embed_in.weight"]
    assert t.dtype == torch.float16
    assert torch.allclose(t.double(), _reference(states, "gpt_neox.embed_in.weight"), rtol=2**-11, atol=2**-24)


def test_tied_weights_are_merged_once_and_stay_tied(tmp_path):
    folders, states = [], []
    for i in range(2):
        config, state = _state(i, tie=True)
        state["embed_out.weight"] = state["gpt_neox.embed_in.weight"]  # shared storage, as torch.save keeps it
        folders.append(_write(tmp_path / f"step{i}", config, state, "bin", torch.float32))
        states.append(state)
    ckpts = CheckpointSet(folders)
    assert ckpts.aliases == {"embed_out.weight": "gpt_neox.embed_in.weight"}
    assert "embed_out.weight" not in ckpts.merged_names
    export_merge(ckpts, [0.5, 0.5], tmp_path / "out")
    out = _read_output(tmp_path / "out")
    assert torch.equal(out["embed_out.weight"], out["gpt_neox.embed_in.weight"])


# HF_BOMERGE_TEST_DEVICE=cuda runs the resident merger on a GPU (benchmarks/gpu_check.sh), against the CPU export
DEVICE = os.environ.get("HF_BOMERGE_TEST_DEVICE", "cpu")


@pytest.mark.parametrize("chunk", [engine.CHUNK, 1000])
@pytest.mark.parametrize("model_dtype, weights", [(torch.float32, WEIGHTS), (torch.bfloat16, WEIGHTS),
                                                  (torch.float32, [0.35, 0.65]), (torch.float32, [-0.5, 1.5])])
def test_resident_merger_matches_export_bit_for_bit(tmp_path, model_dtype, weights, chunk, monkeypatch):
    """N checkpoints, and two (θ₀ + λΔ, one axpy per trial, extrapolation included); also for a
    half-precision model (as on GPU), which still accumulates in float32; also when the export's
    cache-blocked accumulator cuts every tensor into many chunks (chunk=1000 elements) summed into a file
    buffer of a few blocks, handed to the writer thread mid-tensor."""
    monkeypatch.setattr(engine, "CHUNK", chunk)
    if chunk < engine.CHUNK:
        monkeypatch.setattr(durable, "BUFFER", 4 * durable.BLOCK)
    folders, states = _trajectory(tmp_path, ["bin", "safetensors", "bin"][-len(weights):])
    ckpts = CheckpointSet(folders)
    model = AutoModelForCausalLM.from_pretrained(folders[-1], dtype=model_dtype).to(DEVICE)
    merger = ResidentMerger(model, ckpts)
    merger.apply(weights)
    export_merge(ckpts, weights, tmp_path / "out")
    out = _read_output(tmp_path / "out")
    params = dict(model.named_parameters())
    assert params
    stored = {"lm_head.weight": "embed_out.weight"}
    for name, p in params.items():
        assert torch.equal(p.detach().cpu(), out[stored.get(name, name)].to(model_dtype)), name
    merger.apply([0.0] * (len(weights) - 1) + [1.0])  # a new trial overwrites in place
    assert torch.equal(params["lm_head.weight"].detach().cpu(), states[-1]["embed_out.weight"].to(model_dtype))


def test_mismatched_names_and_shapes_name_the_tensor_and_revisions(tmp_path):
    folders, _ = _trajectory(tmp_path, ["bin", "bin"], legacy=False)
    config, state = _state(5)
    state["embed_out.weight"] = torch.zeros(97, 32)
    odd = _write(tmp_path / "step999", config, state, "safetensors")
    with pytest.raises(CheckpointError, match=r"embed_out\.weight.*step100.*step999|embed_out\.weight.*step999"):
        CheckpointSet([folders[0], odd])
    del state["embed_out.weight"]
    odd2 = _write(tmp_path / "step1000", config, state, "safetensors")
    with pytest.raises(CheckpointError, match=r"step100.*embed_out\.weight|embed_out\.weight"):
        CheckpointSet([folders[0], odd2])


def test_non_float_and_legacy_buffers_are_not_weighted(tmp_path):
    folders, _ = _trajectory(tmp_path, ["bin", "bin"])
    ckpts = CheckpointSet(folders)
    merged = set(ckpts.merged_names)
    assert not any(n.endswith(("masked_bias", "inv_freq", "attention.bias")) for n in merged)
    assert all(is_merged(ckpts.infos[n]) for n in merged)


def test_legacy_non_zip_bin_falls_back_to_weights_only_load(tmp_path):
    config, state = _state(0)
    folder = tmp_path / "step1"
    folder.mkdir()
    config.save_pretrained(folder)
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    ckpt = CheckpointSet([folder, folder])
    assert torch.equal(ckpt.checkpoints[0].get("embed_out.weight"), state["embed_out.weight"])


def test_the_finiteness_check_is_exact_even_when_the_fast_sum_overflows():
    from hf_bomerge.merging.engine import _all_finite

    big = torch.full((1000,), 3e38)  # every element finite, their sum overflows float32
    assert _all_finite(big)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.zeros(1000)
        x[517] = bad
        assert not _all_finite(x)
    x = torch.zeros(1000)
    x[1], x[2] = float("inf"), -float("inf")  # the sum is NaN, not inf: still caught
    assert not _all_finite(x)
