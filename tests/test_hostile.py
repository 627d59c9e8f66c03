"""Hostile and broken inputs, made by the tests as an attacker or a crash would make them: shard indexes that point
outside their revision, safetensors headers that break the format, `.bin` files holding more than tensors,
checkpoints that change under a run, and a disk that fills up mid-export. Every case ends in one clear error (exit
2 from the CLI), with nothing read from outside the revision and nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from hf_bomerge.cli import main
from hf_bomerge.errors import ChangedFileError, CheckpointError, CorruptFileError, OutputError, UnsafeFileError
from hf_bomerge.reading.checkpoints import Checkpoint, CheckpointSet
from hf_bomerge.reading.formats import read_safetensors_header
from hf_bomerge.reading.layout import shard_names
from hf_bomerge.sources import FolderSource

INDEX = "model.safetensors.index.json"


def hostile_revision(folder: Path, honest: Path, shard: str) -> None:
    """A revision whose index maps every tensor of `honest` (a checkpoint folder) to the file name `shard`."""
    folder.mkdir(parents=True)
    shutil.copy(honest / "config.json", folder / "config.json")
    names = list(load_file(honest / "model.safetensors"))
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": {n: shard for n in names}}))


@pytest.fixture
def secret(trajectory, tmp_path) -> Path:
    """A file outside every revision that an attacker wants merged (and then published): a valid checkpoint."""
    path = tmp_path / "elsewhere" / "secret.safetensors"
    path.parent.mkdir()
    shutil.copy(trajectory / "main" / "model.safetensors", path)
    return path


def outside_names(secret: Path, revision: Path) -> list[str]:
    return [str(secret), os.path.relpath(secret, revision), "..\\..\\" + secret.name, "C:" + secret.name,
            "file://" + str(secret), "sub/../" + secret.name, "./" + secret.name]


# ---- containment -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["/etc/passwd", "../model.safetensors", "a/../../b.safetensors",
                                  "C:\\x.safetensors", "c:x.safetensors", "\\\\host\\share.safetensors",
                                  "file:///etc/passwd.safetensors", "https://x/y.safetensors", "..", "",
                                  "sub/model.safetensors", "optimizer.pt", "x\0.safetensors", "*.safetensors", 5, None])
def test_an_index_naming_anything_but_a_file_beside_it_is_refused(name):
    index = json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": name}})
    with pytest.raises(UnsafeFileError, match="step7.*model.safetensors.index.json.*not a file beside the index"):
        shard_names(index, INDEX, "step7")


@pytest.mark.parametrize("text", ["[]", '{"weight_map": []}', '{"weight_map": {}}', "{", '"x"'])
def test_an_index_that_is_not_one_is_a_corrupt_file(text):
    with pytest.raises(CorruptFileError, match=INDEX):
        shard_names(text, INDEX, "step7")


def test_custom_shard_names_beside_the_index_are_read():
    index = {"weight_map": {"a": "weights-a.safetensors", "b": "weights-b.safetensors", "c": "weights-a.safetensors"}}
    assert shard_names(json.dumps(index), INDEX, "r") == ["weights-a.safetensors", "weights-b.safetensors"]


def test_a_folder_revision_pointing_outside_is_refused_before_reading(trajectory, secret, tmp_path, capsys):
    """The attack of issue 22 on a local folder: before the fix, the merge IS the outside file's tensors."""
    for i, name in enumerate(outside_names(secret, tmp_path / "run" / "x")):
        run = tmp_path / f"run{i}"
        hostile_revision(run / "step1", trajectory / "main", name)
        shutil.copytree(trajectory / "main", run / "step2")
        out = tmp_path / f"out{i}"
        code = main([str(run), "--revisions", "step1,step2", "--weights", "1,0", "--no-eval", "--output", str(out),
                     "--quiet", "--cache-dir", str(tmp_path / "cache")])
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        assert "Traceback" not in err and "step1" in err and INDEX in err and repr(name)[1:-1][:20] in err, err
        assert not out.exists() and not list(tmp_path.glob(f".out{i}*"))


def test_a_hostile_git_branch_is_refused(trajectory, secret, tmp_path, capsys):
    from testhub import make_git_repo

    names = list(load_file(trajectory / "main" / "model.safetensors"))
    hostile = {"config.json": trajectory / "main" / "config.json",
               INDEX: json.dumps({"weight_map": {n: str(secret) for n in names}})}
    honest = {p.name: p for p in (trajectory / "main").iterdir() if p.is_file()}
    make_git_repo(tmp_path / "repo", {"step1": hostile, "step2": honest}, lfs=False)
    code = main([str(tmp_path / "repo"), "--revisions", "step1,step2", "--weights", "1,0", "--no-eval",
                 "--output", str(tmp_path / "out"), "--quiet", "--cache-dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and "not a file beside the index" in err and str(secret) in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_a_hostile_hub_repo_is_refused_by_the_plan_the_download_and_watch(test_hub, trajectory, secret, tmp_path,
                                                                            capsys):
    """The issue's exact attack, served by the test Hub: the outside file named by an absolute path and by `../`."""
    from hf_bomerge.sources import arrivals

    names = list(load_file(trajectory / "main" / "model.safetensors"))
    honest = {p.name: p for p in (trajectory / "main").iterdir() if p.is_file()}
    for repo, target in (("evil/absolute", str(secret)), ("evil/dotdot", "../../../../../../../.." + str(secret))):
        hostile = {"config.json": trajectory / "main" / "config.json",
                   INDEX: json.dumps({"weight_map": {n: target for n in names}})}
        test_hub.add_model_repo(repo, {"step1": hostile, "step2": honest})
        for extra in (["--weights", "1,0", "--no-eval"], ["--trials", "3"], ["--dry-run"]):
            out = tmp_path / repo.replace("/", "-")
            code = main([repo, "--revisions", "step1,step2", *extra, "--output", str(out), "--quiet",
                         "--cache-dir", str(tmp_path / "cache")])
            err = capsys.readouterr().err
            assert code == 2 and "Traceback" not in err, err
            assert "step1" in err and INDEX in err and "not a file beside the index" in err, err
            assert not out.exists()
        with pytest.raises(UnsafeFileError, match="step1"):
            arrivals(repo)


def test_an_offline_cache_with_a_hostile_index_is_refused(trajectory, secret, tmp_path, monkeypatch):
    """The offline path reads the index from the HF cache's snapshot folder: the same check applies."""
    from huggingface_hub import constants

    from hf_bomerge.sources import HubSource

    sha = "a" * 40
    snap = tmp_path / "hub" / "models--evil--offline" / "snapshots" / sha
    hostile_revision(snap, trajectory / "main", str(secret))
    (tmp_path / "hub" / "models--evil--offline" / "refs").mkdir()
    (tmp_path / "hub" / "models--evil--offline" / "refs" / "step1").write_text(sha)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    source = HubSource("evil/offline", cache_dir=tmp_path / "hub")
    with pytest.raises(UnsafeFileError, match="step1"):
        source.missing("step1", sha)
    with pytest.raises(UnsafeFileError, match="step1"):
        source.fetch("step1", sha)


# ---- the plan counts what the headers say ------------------------------------------------------------------

def test_the_plan_counts_parameters_from_headers_not_names_or_config(trajectory, tmp_path):
    """Shards named freely by the index, and a config claiming float64 over fp16 weights: the count is the
    headers' (before the fix: 0 parameters for such shard names, a quarter of them for the float64 config)."""
    tensors = {k: v.to(torch.float16) for k, v in load_file(trajectory / "main" / "model.safetensors").items()}
    true_count = sum(t.numel() for t in tensors.values())
    run = tmp_path / "run"
    for scale, step in ((1.0, "step1"), (0.5, "step2")):  # two distinct payloads (identical ones are merged once)
        folder = run / step
        folder.mkdir(parents=True)
        config = json.loads((trajectory / "main" / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": "float64", "dtype": "float64"}))
        names = sorted(tensors)
        half = {n: "weights-a.safetensors" if i % 2 else "weights-b.safetensors" for i, n in enumerate(names)}
        for shard in set(half.values()):
            save_file({n: tensors[n] * scale for n in names if half[n] == shard}, folder / shard)
        (folder / INDEX).write_text(json.dumps({"weight_map": half}))
    from hf_bomerge.api import plan

    planned = plan(str(run), "step1,step2", device="cpu")
    assert planned.params == true_count
    assert planned.stored_bytes == 2 * true_count
    assert planned.checkpoint_bytes == sum((run / "step2" / s).stat().st_size for s in set(half.values()))


# ---- safetensors headers as the format requires -------------------------------------------------------------

def write_st(path: Path, header, data: bytes = b"", size: int | None = None) -> Path:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw) if size is None else size) + raw + data)
    return path


F16 = {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}
BROKEN = {
    "header length 2^62": ({"a": F16}, b"\0" * 4, 2**62),
    "header longer than the file": ({"a": F16}, b"\0" * 4, 10**6),
    "a JSON list": ([1, 2], b"", None),
    "not JSON": (b"{nope", b"", None),
    "no data_offsets": ({"a": {"dtype": "F16", "shape": [2]}}, b"\0" * 4, None),
    "overlap": ({"a": F16, "b": {"dtype": "F16", "shape": [2], "data_offsets": [2, 6]}}, b"\0" * 6, None),
    "hole": ({"a": F16, "b": {"dtype": "F16", "shape": [1], "data_offsets": [6, 8]}}, b"\0" * 8, None),
    "shape larger than its bytes": ({"a": {"dtype": "F16", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4, None),
    "negative dim": ({"a": {"dtype": "F16", "shape": [-2], "data_offsets": [0, 4]}}, b"\0" * 4, None),
    "unknown dtype": ({"a": {"dtype": "F17", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, None),
    "truncated data": ({"a": F16}, b"\0" * 2, None),
    "trailing bytes": ({"a": F16}, b"\0" * 6, None),
    "offsets not from 0": ({"a": {"dtype": "F16", "shape": [2], "data_offsets": [2, 6]}}, b"\0" * 6, None),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_header_breaking_the_format_is_a_corrupt_file(case, tmp_path):
    header, data, size = BROKEN[case]
    path = write_st(tmp_path / "model.safetensors", header, data, size)
    with pytest.raises(CorruptFileError, match=str(path)):
        read_safetensors_header(path)


@pytest.mark.parametrize("dtype, torch_dtype", [("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2),
                                                 ("U16", torch.uint16), ("U32", torch.uint32), ("BF16", torch.bfloat16)])
def test_every_dtype_torch_holds_is_read(dtype, torch_dtype, tmp_path):
    tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3).to(torch_dtype)
    save_file({"w": tensor}, tmp_path / "model.safetensors")
    got = Checkpoint(tmp_path).get("w")
    assert got.dtype == torch_dtype and torch.equal(got.view(torch.uint8), tensor.view(torch.uint8))


def test_a_dtype_torch_lacks_is_named(tmp_path):
    write_st(tmp_path / "model.safetensors", {"a": {"dtype": "F8_E8M0", "shape": [2], "data_offsets": [0, 2]}},
             b"\0" * 2)
    with pytest.raises(CheckpointError, match="F8_E8M0"):
        Checkpoint(tmp_path)


def test_a_crafted_header_through_the_cli_exits_2_and_writes_nothing(trajectory, tmp_path, capsys):
    run = tmp_path / "run"
    for step in ("step1", "step2"):
        shutil.copytree(trajectory / "main", run / step)
    path = run / "step1" / "model.safetensors"
    raw = bytearray(path.read_bytes())
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    first = next(k for k in header if k != "__metadata__")
    header[first]["shape"] = [header[first]["shape"][0] * 2, *header[first]["shape"][1:]]  # reads its neighbour
    text = json.dumps(header).encode().ljust(size)
    path.write_bytes(bytes(raw[:8]) + text[:size] + bytes(raw[8 + size:]))
    code = main([str(run), "--revisions", "step1,step2", "--weights", "0.5,0.5", "--no-eval", "--output",
                 str(tmp_path / "out"), "--quiet", "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and str(path) in err and "not a valid safetensors file" in err, err
    assert not (tmp_path / "out").exists()


def _valid_header() -> tuple[dict, bytes]:
    header = {"__metadata__": {"format": "pt"}, "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
              "b": {"dtype": "F16", "shape": [3], "data_offsets": [16, 22]},
              "c": {"dtype": "I64", "shape": [1], "data_offsets": [22, 30]}}
    return header, bytes(range(30))


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**65, 2**65), st.floats(allow_nan=True),
                     st.text(max_size=8))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4),
                                                                                             inner, max_size=3),
                       max_leaves=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_headers_are_accepted_cleanly_or_refused_as_corrupt(tmp_path, data):
    """Random mutations of a valid header (a field replaced, a key dropped, bytes flipped, the length changed): the
    reader either accepts the file and every tensor reads within the data, or raises CorruptFileError/
    CheckpointError. Never another exception, never a tensor outside its bytes."""
    header, payload = _valid_header()
    kind = data.draw(st.sampled_from(["field", "drop", "flip", "length", "data"]))
    raw = json.dumps(header).encode()
    size = None
    if kind == "field":
        name = data.draw(st.sampled_from(["a", "b", "c", "__metadata__"]))
        key = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
        if name == "__metadata__":
            header[name] = data.draw(_values)
        else:
            header[name][key] = data.draw(_values)
        raw = json.dumps(header).encode()
    elif kind == "drop":
        header.pop(data.draw(st.sampled_from(sorted(header))))
        raw = json.dumps(header).encode()
    elif kind == "flip":
        at = data.draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([data.draw(st.integers(0, 255))]) + raw[at + 1:]
    elif kind == "length":
        size = data.draw(st.integers(0, 2**64 - 1))
    else:
        payload = payload[:data.draw(st.integers(0, len(payload) + 8))].ljust(data.draw(st.integers(0, 40)), b"\0")
    path = tmp_path / "model.safetensors"
    write_st(path, raw, payload, size)
    try:
        ckpt = Checkpoint(tmp_path)
    except CheckpointError:  # CorruptFileError included
        return
    data_len = path.stat().st_size - 8 - struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert sum(i.nbytes for i in ckpt.infos.values()) == data_len
    for name in ckpt.infos:
        assert ckpt.get(name).numel() == ckpt.infos[name].numel


# ---- .bin files holding more than tensors ---------------------------------------------------------------------

def test_a_bin_with_non_tensor_entries_uses_the_tensors_and_names_the_rest_once(trajectory, tmp_path, caplog):
    run = tmp_path / "run"
    state = torch.load(trajectory / "step600" / "pytorch_model.bin", weights_only=True)
    for step in ("step1", "step2"):
        shutil.copytree(trajectory / "step600", run / step)
        torch.save({**state, "step": 5, "optimizer_meta": {"lr": 0.1}, "history": [1, 2]},
                   run / step / "pytorch_model.bin")
    with caplog.at_level("WARNING"):
        ckpts = CheckpointSet([run / "step1", run / "step2"])
    assert set(ckpts.infos) == set(state)
    warnings = [r.getMessage() for r in caplog.records if "not tensors" in r.getMessage()]
    assert len(warnings) == 1 and all(k in warnings[0] for k in ("step", "optimizer_meta", "history"))


@pytest.mark.parametrize("content", [{"model": {"w": torch.ones(2)}, "step": 3}, [torch.ones(2)], {"step": 3}])
def test_a_bin_without_top_level_tensors_is_a_clear_refusal(content, tmp_path):
    torch.save(content, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="state dict"):
        Checkpoint(tmp_path)


# ---- files that change under a run ------------------------------------------------------------------------------

def _two_revisions(trajectory: Path, run: Path) -> None:
    """Two revisions of the demo run as a local folder (Pythia-like: pytorch_model.bin, fp16)."""
    for step in ("step550", "step600"):
        shutil.copytree(trajectory / step, run / step)


@pytest.mark.parametrize("change", ["rewrite", "truncate", "replace"])
def test_a_checkpoint_changed_under_a_run_is_noticed(trajectory, tmp_path, change):
    run = tmp_path / "run"
    _two_revisions(trajectory, run)
    ckpts = CheckpointSet([run / "step550", run / "step600"])
    path = run / "step550" / "pytorch_model.bin"
    if change == "rewrite":
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    elif change == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    else:
        shutil.copy(run / "step600" / "pytorch_model.bin", path.with_suffix(".new"))
        os.replace(path.with_suffix(".new"), path)
    with pytest.raises(ChangedFileError, match=f"step550.*{path}"):
        ckpts.check_unchanged()


def test_the_export_refuses_a_checkpoint_changed_since_the_merge(trajectory, tmp_path):
    import hf_bomerge

    run = tmp_path / "run"
    _two_revisions(trajectory, run)
    result = hf_bomerge.merge(str(run), "step550,step600", weights=[0.5, 0.5], evaluate=False,
                              cache_dir=tmp_path / "cache", progress=False)
    path = run / "step550" / "pytorch_model.bin"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with pytest.raises(ChangedFileError, match="step550"):
        result.save_pretrained(tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.e2e
def test_a_search_over_a_checkpoint_rewritten_mid_run_reports_nothing(test_hub, tmp_path):
    """A real search in a subprocess; a file of it is rewritten in place (same size, other bytes) while it runs."""
    run = tmp_path / "run"
    _two_revisions(test_hub.trajectory, run)
    target = run / "step550" / "pytorch_model.bin"
    script = f"""
import os, sys, hf_bomerge
from hf_bomerge.errors import ChangedFileError
calls = 0
def on_trial(*args, **kwargs):
    global calls
    calls += 1
    if calls == 2:
        data = bytearray(open({str(target)!r}, "rb").read()); data[-4:] = b"\\x00\\x3c\\x00\\x3c"
        with open({str(target)!r}, "r+b") as f: f.write(data)
try:
    hf_bomerge.search({str(run)!r}, "step550,step600", trials=6,
                      dataset={str(test_hub.trajectory / 'heldout' / 'validation.jsonl')!r},
                      cache_dir={str(tmp_path / 'cache')!r}, progress=False, on_trial=on_trial, device="cpu")
except ChangedFileError as err:
    print("CHANGED", err); sys.exit(3)
print("REPORTED")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3 and "CHANGED" in proc.stdout and str(target) in proc.stdout, proc.stderr[-3000:]


# ---- export faults ------------------------------------------------------------------------------------------------

def test_a_stale_partial_of_a_dead_run_is_removed_by_the_next(trajectory, tmp_path):
    import socket

    import hf_bomerge

    run = tmp_path / "run"
    _two_revisions(trajectory, run)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = socket.gethostname()
        stale = tmp_path / f".out.{host}-{dead.pid}-abc123.partial"
        live = tmp_path / f".out.{host}-{alive.pid}-def456.partial"
        other_host = tmp_path / f".out.elsewhere-{dead.pid}-ghi789.partial"
        for folder in (stale, live, other_host):
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"half")
        result = hf_bomerge.merge(str(run), "step550,step600", weights=[0.5, 0.5], evaluate=False,
                                  cache_dir=tmp_path / "cache", progress=False)
        result.save_pretrained(tmp_path / "out", progress=False)
        assert (tmp_path / "out" / "model.safetensors").is_file()
        assert not stale.exists() and live.exists() and other_host.exists()
    finally:
        alive.kill()


def test_a_full_disk_mid_export_is_one_message_and_leaves_nothing(trajectory, tmp_path, monkeypatch):
    """A full disk cannot be made here without privileges (no tmpfs mount in CI): the shard writer's `os.write`
    is made to fail with ENOSPC as a full disk fails it. Everything around it is real."""
    import errno

    import hf_bomerge
    from hf_bomerge.merging import durable

    run = tmp_path / "run"
    _two_revisions(trajectory, run)
    result = hf_bomerge.merge(str(run), "step550,step600", weights=[0.5, 0.5], evaluate=False,
                              cache_dir=tmp_path / "cache", progress=False)

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(durable.os, "write", full)
    with pytest.raises(OutputError, match=f"disk holding {tmp_path}.*filled up"):
        result.save_pretrained(tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_the_free_space_check_measures_the_outputs_file_system(trajectory, tmp_path, monkeypatch):
    """The output's disk is made to look full (shutil.disk_usage answers for that path only: a small file
    system cannot be mounted here); the cache's disk has room. The refusal comes before anything is written."""
    import hf_bomerge
    from hf_bomerge import plan as plan_module

    run = tmp_path / "run"
    _two_revisions(trajectory, run)
    result = hf_bomerge.merge(str(run), "step550,step600", weights=[0.5, 0.5], evaluate=False,
                              cache_dir=tmp_path / "cache", progress=False)
    small = tmp_path / "small-disk"
    small.mkdir()
    real = shutil.disk_usage

    def usage(path):
        if Path(path).resolve() == small.resolve():
            return real(path)._replace(free=1000)
        return real(path)

    monkeypatch.setattr(plan_module.shutil, "disk_usage", usage)
    with pytest.raises(OutputError, match=f"disk holding {small}"):
        result.save_pretrained(small / "out", progress=False)
    assert list(small.iterdir()) == []


def test_folder_source_refs_refuse_a_hostile_revision(trajectory, secret, tmp_path):
    run = tmp_path / "run"
    hostile_revision(run / "step1", trajectory / "main", str(secret))
    shutil.copytree(trajectory / "main", run / "step2")
    with pytest.raises(UnsafeFileError, match="step1"):
        FolderSource(run).refs()


@pytest.mark.e2e
def test_the_hub_plan_counts_parameters_from_the_served_headers(test_hub, trajectory, tmp_path):
    """The same on the test Hub: headers read with range requests (no weight downloaded), shards freely named."""
    from hf_bomerge.api import plan

    tensors = load_file(trajectory / "main" / "model.safetensors")
    names = sorted(tensors)
    half = {n: "weights-a.safetensors" if i % 2 else "weights-b.safetensors" for i, n in enumerate(names)}
    config = json.loads((trajectory / "main" / "config.json").read_text())
    branches = {}
    for scale, step in ((1.0, "step1"), (0.5, "step2")):  # two distinct payloads (identical ones are merged once)
        files = {INDEX: json.dumps({"weight_map": half}), "config.json": json.dumps({**config, "dtype": "float64"})}
        for shard in set(half.values()):
            save_file({n: tensors[n] * scale for n in names if half[n] == shard}, tmp_path / f"{step}-{shard}")
            files[shard] = tmp_path / f"{step}-{shard}"
        branches[step] = files
    test_hub.add_model_repo("odd/shard-names", branches)
    planned = plan("odd/shard-names", "step1,step2", device="cpu", cache_dir=tmp_path / "cache")
    assert planned.params == sum(t.numel() for t in tensors.values())
    assert planned.stored_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert planned.download_bytes == sum((tmp_path / f"{step}-{s}").stat().st_size for step in branches
                                         for s in set(half.values()))
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # planned from headers: nothing downloaded
