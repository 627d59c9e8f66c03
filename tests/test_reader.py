"""The zero-copy safetensors reader: the same tensors and merged files as `.bin` inputs and `load_file` give."""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load_file, save_file

from hf_bomerge.merging.writer import export_merge
from hf_bomerge.reading.checkpoints import Checkpoint, CheckpointSet


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(300, 17, generator=g).half(),
        "norm.weight": torch.randn(17, generator=g).bfloat16(),
        "head.weight": torch.randn(5, 3, generator=g, dtype=torch.float64),
        "scale": torch.randn((), generator=g),
        "mask": torch.rand(4, 4, generator=g) > 0.5,
        "ids": torch.arange(-3, 9, dtype=torch.int64),
        "small": torch.arange(7, dtype=torch.int8),
        "empty": torch.empty(0, 4),
    }


def test_safetensors_reader_returns_what_load_file_returns(tmp_path):
    save_file(_tensors(), tmp_path / "model.safetensors", metadata={"format": "pt"})
    expected = load_file(tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path)
    assert set(ckpt.infos) == set(expected)
    for name, ref in expected.items():
        got = ckpt.get(name)
        assert got.dtype == ref.dtype and got.shape == ref.shape and torch.equal(got, ref), name
        ckpt.prefetch(name)
        ckpt.release(name)  # pages handed back: read again from the file, same values
        assert torch.equal(ckpt.get(name), ref), name


def test_reader_copies_out_unaligned_data_and_never_writes_the_file(tmp_path):
    """A writer that does not pad its header leaves fp16 data at odd offsets: still read exactly."""
    a, b = torch.arange(5, dtype=torch.int8), torch.randn(6).half()
    header = {"a": {"dtype": "I8", "shape": [5], "data_offsets": [0, 5]},
              "b": {"dtype": "F16", "shape": [6], "data_offsets": [5, 17]}}
    raw = json.dumps(header).encode()
    raw += b" " * ((-len(raw)) % 8)  # the header ends 8-aligned, the data of "b" at an odd offset
    path = tmp_path / "model.safetensors"
    blob = struct.pack("<Q", len(raw)) + raw + a.numpy().tobytes() + b.numpy().tobytes()
    path.write_bytes(blob)
    ckpt = Checkpoint(tmp_path)
    assert torch.equal(ckpt.get("a"), a) and torch.equal(ckpt.get("b"), b)
    ckpt.get("a").fill_(42)  # a private mapping: this process's copy changes, the file does not
    assert path.read_bytes() == blob


def test_export_from_safetensors_equals_export_from_bin(tmp_path):
    """The two readers feed the same merge: bit-identical tensors (the files order them as their inputs do)."""
    states = [{k: v for k, v in _tensors().items() if v.is_floating_point()} for _ in range(3)]
    for i, state in enumerate(states):
        for t in state.values():
            t.add_(i)  # three different checkpoints
        st, pt = tmp_path / "st" / f"step{i}", tmp_path / "pt" / f"step{i}"
        st.mkdir(parents=True), pt.mkdir(parents=True)
        save_file(state, st / "model.safetensors", metadata={"format": "pt"})
        torch.save(state, pt / "pytorch_model.bin")
    weights = [0.2, 0.3, 0.5]
    outs = []
    for fmt in ("st", "pt"):
        folders = [tmp_path / fmt / f"step{i}" for i in range(3)]
        outs.append(export_merge(CheckpointSet(folders), weights, tmp_path / f"out-{fmt}", max_shard_size=2_000))
    assert len(outs[0]) > 1
    merged = [{k: v for f in files for k, v in load_file(f).items()} for files in outs]
    assert set(merged[0]) == set(merged[1]) == set(states[0])
    for name, tensor in merged[0].items():
        assert tensor.dtype == merged[1][name].dtype and torch.equal(tensor.view(-1).view(torch.uint8),
                                                                      merged[1][name].view(-1).view(torch.uint8)), name
