"""Distributed-checkpoint (DCP) sources: real checkpoints written by 2 gloo ranks (DTensor `Shard(0)`), merged
through the CLI, checked against torch's own `dcp.load` and a float64 sum, plain transformers forwards, and
torchtitan's rotary layout; hostile metadata refused; readiness for `watch`."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hf_bomerge.cli import main
from hf_bomerge.errors import CorruptFileError, OptionError, UnsafeFileError
from hf_bomerge.reading.dcp import read_metadata
from hf_bomerge.reading.keymap import BUILTIN, parse_key_map, select
from hf_bomerge.sources import arrivals, folder_incomplete, open_source

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dcpwriter
from measure import document_blocks, heldout_loss

STEPS = (2, 3, 4)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
TITAN = {v.split()[0]: k for k, v in (line.split(" = ") for line in BUILTIN["torchtitan-llama"].strip().splitlines())}


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)


def titan_name(hf: str) -> str:
    """An HF Llama name in torchtitan's names (the built-in map read backwards)."""
    for pattern, run in TITAN.items():
        rule = parse_key_map(f"{pattern} = {run}", "test")[0]
        if (name := rule.match(hf)) is not None:
            return name
    raise KeyError(hf)


def to_titan(state: dict, config) -> dict:
    """HF Llama weights as torchtitan holds them: its names, and wq/wk in the interleaved rotary layout
    (torchtitan's `Llama3StateDictAdapter.from_hf`, `_reverse_permute`)."""
    out = {}
    for name, w in state.items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            w = w.view(heads, 2, w.shape[0] // heads // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)
        out[titan_name(name)] = w.clone()
    return out


@pytest.fixture(scope="module")
def runs(trajectory: Path, tmp_path_factory) -> dict:
    """A tiny HF Llama trained 4 steps, checkpoints at 2, 3, 4: as an accelerate/Trainer FSDP run
    (`checkpoint-N/pytorch_model_fsdp_0`, `optimizer_0` beside it) and as a torchtitan run (`step-N/`, model and
    optimizer keys in one DCP, the config in a folder of its own), each written by 2 ranks."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    root = tmp_path_factory.mktemp("dcp")
    config = _llama_config()
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    tokenizer = AutoTokenizer.from_pretrained(trajectory / "step600")
    texts = [json.loads(line)["text"] for line in (trajectory / "heldout" / "validation.jsonl").open()][:40]
    blocks = document_blocks(texts, tokenizer, 64, 4096)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    states, jobs = {}, []
    for step in range(1, max(STEPS) + 1):
        loss = model(input_ids=blocks[step % len(blocks)][None], labels=blocks[step % len(blocks)][None]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step not in STEPS:
            continue
        states[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        trainer = root / "fsdp" / f"checkpoint-{step}"
        trainer.mkdir(parents=True)
        config.save_pretrained(trainer)
        for f in TOKENIZER_FILES:
            shutil.copy(trajectory / "step600" / f, trainer)
        (trainer / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        torch.save({"model": states[step]}, root / f"model-{step}.pt")
        moments = {k: {"exp_avg": s["exp_avg"].clone()} for k, s in zip(states[step], optimizer.state.values())}
        torch.save({"optimizer": {"state": moments}}, root / f"optim-{step}.pt")
        titan = to_titan(states[step], config)
        torch.save({**titan, "optimizer": {"state": {k: v.clone() for k, v in list(titan.items())[:3]}},
                    "train_state": {"step": step}}, root / f"titan-{step}.pt")
        jobs += [(str(root / f"model-{step}.pt"), str(trainer / "pytorch_model_fsdp_0")),
                 (str(root / f"optim-{step}.pt"), str(trainer / "optimizer_0")),
                 (str(root / f"titan-{step}.pt"), str(root / "titan" / f"step-{step}"))]
    dcpwriter.write(jobs, str(root / "rendezvous"))
    config_dir = root / "titan-config"
    config.save_pretrained(config_dir)
    for f in TOKENIZER_FILES:
        shutil.copy(trajectory / "step600" / f, config_dir)
    heldout = root / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:12]))
    return {"root": root, "fsdp": root / "fsdp", "titan": root / "titan", "config": config_dir, "states": states,
            "heldout": heldout, "config_obj": config}


def dcp_load(folder: Path, like: dict, prefix: str = "") -> dict:
    """torch's own reader: `dcp.load` into a plain state dict of empty tensors (independent of hf-bomerge)."""
    import torch.distributed.checkpoint as dcp

    state = {k: torch.empty_like(v) for k, v in like.items()}
    dcp.load({"model": state} if prefix else state, checkpoint_id=str(folder))
    return state


@pytest.mark.e2e
def test_really_sharded_by_two_ranks(runs):
    folder = runs["fsdp"] / "checkpoint-4" / "pytorch_model_fsdp_0"
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    entries, _ = read_metadata(folder)
    chunks = entries["model.model.embed_tokens.weight"].chunks
    assert [list(c.offsets) for c in chunks] == [[0, 0], [512, 0]]


@pytest.mark.e2e
def test_fixed_merge_matches_float64_reference_and_never_reads_the_optimizer(runs, tmp_path):
    fsdp = tmp_path / "fsdp"
    shutil.copytree(runs["fsdp"], fsdp)
    for step in STEPS:  # the optimizer's DCP is garbage now: a merge that read it would fail
        for f in (fsdp / f"checkpoint-{step}" / "optimizer_0").iterdir():
            f.write_bytes(b"not a checkpoint")
    out = tmp_path / "merged"
    weights = [0.2, 0.3, 0.5]
    code = main([str(fsdp), "--revisions", "checkpoint-2..checkpoint-4", "--weights", ",".join(map(str, weights)),
                 "--no-eval", "--output", str(out), "--quiet", "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out).state_dict()
    like = runs["states"][4]
    loaded = [dcp_load(runs["fsdp"] / f"checkpoint-{s}" / "pytorch_model_fsdp_0", like, "model") for s in STEPS]
    for name in like:
        reference = sum(w * state[name].double() for w, state in zip(weights, loaded))
        assert torch.allclose(saved[name].double(), reference, rtol=0, atol=2e-7 * reference.abs().max().item() + 1e-9), name
    assert (out / "tokenizer.json").is_file()
    assert not (out / "dcp").exists()
    assert "which mergekit does not read" in (out / "mergekit_config.yml").read_text().replace("\n# ", " ")
    cached = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # no consolidated copy: only the views
    assert cached and all(p.suffix == ".json" for p in cached), cached


@pytest.mark.e2e
def test_fixed_merge_loss_equals_transformers_and_a_search_runs(runs, tmp_path, capsys):
    out = tmp_path / "merged"
    args = [str(runs["fsdp"]), "--revisions", "last:3", "--dataset", str(runs["heldout"]), "--block-size", "64",
            "--max-eval-tokens", "1024",
            "--quiet", "--cache-dir", str(tmp_path / "cache"), "--json", "--device", "cpu"]
    assert main([*args, "--method", "sma", "--output", str(out)]) == 0
    reported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    measured = heldout_loss(out, str(runs["heldout"]), block_size=64, max_tokens=1024)
    assert reported["loss"] == pytest.approx(measured, rel=1e-5)
    assert main([*args, "--trials", "5", "--output", str(tmp_path / "searched")]) == 0
    found = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(found["weights"]) == 3 and found["trials"] == 5


@pytest.mark.e2e
def test_torchtitan_folder_with_builtin_map_gives_the_original_logits(runs, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    out = tmp_path / "titan-merged"
    code = main([str(runs["titan"]), "--revisions", "step-2..step-4", "--weights", "0,0,1", "--no-eval",
                 "--config", str(runs["config"]), "--output", str(out), "--quiet", "--save-dcp",
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    original = LlamaForCausalLM(runs["config_obj"]).eval()
    original.load_state_dict(runs["states"][4])
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 1024, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(merged(ids).logits, original(ids).logits)
    # --save-dcp: the merge in torchtitan's own names and q/k layout, as torch's dcp.load reads it back
    titan = to_titan(runs["states"][4], runs["config_obj"])
    back = dcp_load(out / "dcp", titan)
    assert all(torch.equal(back[k], titan[k]) for k in titan)
    # the recipe records --config (and the built-in map is found again): it rebuilds the same bytes
    assert yaml.safe_load((out / "bomerge_recipe.yaml").read_text())["source_options"] == {
        "config": str(Path(runs["config"]).resolve())}
    again = tmp_path / "again"
    assert main(["recipe", str(out / "bomerge_recipe.yaml"), "--output", str(again), "--quiet",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    assert (out / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()


@pytest.mark.e2e
def test_the_rotary_permutation_is_torchtitans(runs):
    """Independent of the key map: torchtitan's rotary (complex products of interleaved pairs, its
    `apply_rotary_emb`) on the torchtitan-layout weights gives the same attention scores as HF Llama's
    `rotate_half` on the HF weights the built-in map reads them as."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config, state = runs["config_obj"], runs["states"][4]
    titan = to_titan(state, config)
    heads, head_dim, seq = config.num_attention_heads, config.hidden_size // config.num_attention_heads, 10
    x = torch.randn(1, seq, config.hidden_size, generator=torch.Generator().manual_seed(2))
    freqs = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cis = torch.polar(torch.ones(seq, head_dim // 2), torch.outer(torch.arange(seq).float(), freqs))

    def titan_rope(w):
        q = (x @ w.T).view(1, seq, -1, head_dim)
        q = torch.view_as_complex(q.reshape(*q.shape[:-1], -1, 2)) * cis[None, :, None, :]
        return torch.view_as_real(q).flatten(3)

    qt, kt = titan_rope(titan["layers.0.attention.wq.weight"]), titan_rope(titan["layers.0.attention.wk.weight"])
    cos, sin = LlamaRotaryEmbedding(config)(x, torch.arange(seq)[None])
    qh = (x @ state["model.layers.0.self_attn.q_proj.weight"].T).view(1, seq, heads, head_dim).transpose(1, 2)
    kh = (x @ state["model.layers.0.self_attn.k_proj.weight"].T).view(1, seq, -1, head_dim).transpose(1, 2)
    qh, kh = apply_rotary_pos_emb(qh, kh, cos, sin)
    groups = heads // config.num_key_value_heads
    for h in range(heads):
        titan_scores = qt[0, :, h] @ kt[0, :, h // groups].T
        hf_scores = qh[0, h] @ kh[0, h // groups].T
        assert torch.allclose(titan_scores, hf_scores, atol=1e-5)


@pytest.mark.e2e
def test_plain_dcp_without_config_or_map_is_refused(runs, tmp_path, capsys):
    plain = tmp_path / "run"
    shutil.copytree(runs["titan"] / "step-4", plain / "step-4")
    shutil.copytree(runs["titan"] / "step-3", plain / "step-3")
    code = main([str(plain), "--weights", "0.5,0.5", "--no-eval", "--output", str(tmp_path / "x"), "--quiet",
                 "--cache-dir", str(tmp_path / "cache")])
    assert code == 2 and "--config" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_config_for_a_transformers_folder_is_refused(source, tmp_path, capsys):
    code = main([str(source), "--weights", "0.2,0.3,0.5", "--no-eval", "--config", str(source / "step600"),
                 "--output", str(tmp_path / "x"), "--quiet"])
    assert code == 2 and "applies only to folders of distributed checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_key_map_rules():
    rules = parse_key_map(BUILTIN["torchtitan-llama"], "builtin")
    got = select(rules, ["layers.7.attention.wk.weight", "optimizer.state.x", "output.weight"], "run")
    assert got == {"model.layers.7.self_attn.k_proj.weight": ("layers.7.attention.wk.weight", "rope:num_key_value_heads"),
                   "lm_head.weight": ("output.weight", None)}
    with pytest.raises(OptionError, match="line 1"):
        parse_key_map("a.* = b", "bad map")
    with pytest.raises(OptionError, match="line 2"):
        parse_key_map("a = b\nno equals sign here", "bad map")


@pytest.mark.e2e
def test_watch_readiness_waits_for_metadata(runs, tmp_path):
    run = tmp_path / "fsdp"
    shutil.copytree(runs["fsdp"], run)
    (run / "checkpoint-4" / "pytorch_model_fsdp_0" / ".metadata").unlink()  # DCP writes it last
    seen = {a.name: a for a in arrivals(str(run), settle=0)}
    assert seen["checkpoint-3"].ready and not seen["checkpoint-4"].ready
    assert ".metadata" in seen["checkpoint-4"].why
    meta = run / "checkpoint-3" / "pytorch_model_fsdp_0" / ".metadata"
    meta.write_bytes(meta.read_bytes()[:200])  # half written
    assert not {a.name: a for a in arrivals(str(run), settle=0)}["checkpoint-3"].ready
    assert open_source(str(run)).kind == "dcp"


def test_a_plain_loop_checkpoint_needs_no_trainer_state(trajectory, tmp_path):
    plain = tmp_path / "checkpoint-700"  # an accelerate / PyTorch loop's save_pretrained: no Trainer files
    shutil.copytree(trajectory / "step600", plain)
    assert folder_incomplete(plain) == ""
    assert folder_incomplete(plain, settle=60) != ""  # just written: not settled yet
    (plain / "optimizer.pt").write_bytes(b"")  # a Trainer is saving: its trainer_state.json comes last
    assert "trainer_state.json" in folder_incomplete(plain)


def _hostile(folder: Path, payload: bytes) -> None:
    (folder / ".metadata").write_bytes(payload)


class _System:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.fixture()
def one_rank(tmp_path) -> Path:
    """A small DCP checkpoint saved by one process: a model key beside an optimizer key."""
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "step-4"
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"layers.0.attention.wq.weight": torch.randn(8, 4), "optimizer.step": torch.ones(3)},
                 checkpoint_id=str(folder))
    return folder


def test_hostile_metadata_is_refused(one_rank, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = one_rank
    _hostile(folder, pickle.dumps(_System()))
    with pytest.raises(UnsafeFileError, match="os.system|posix.system"):
        read_metadata(folder)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("change, error, words", [
    ("length", CorruptFileError, "past its end"),
    ("path", UnsafeFileError, "not a file inside"),
    ("overlap", CorruptFileError, "do not tile"),
])
def test_crafted_offsets_are_refused(one_rank, change, error, words):
    import torch.distributed.checkpoint as dcp

    from hf_bomerge.reading.dcp import tensor_chunks

    folder = one_rank
    meta = dcp.FileSystemReader(str(folder)).read_metadata()  # our own file: torch's unpickler is fine here
    key = "layers.0.attention.wq.weight"
    index = next(k for k in meta.storage_data if k.fqn == key)
    if change == "length":
        meta.storage_data[index].length += 10**6
    elif change == "path":
        meta.storage_data[index].relative_path = "../../etc/passwd"
    else:  # two half boxes, both at the top: the volume adds up, the rows 4..8 are missing
        chunks = meta.state_dict_metadata[key].chunks
        chunks[0].sizes = torch.Size([4, 4])
        chunks.append(dataclasses.replace(chunks[0]))
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    entries, storage = read_metadata(folder)
    with pytest.raises(error, match=words):
        tensor_chunks(folder, key, entries[key], storage)


@pytest.mark.e2e
def test_plan_and_recipe(runs, tmp_path, capsys):
    fsdp = str(runs["fsdp"])
    assert main([fsdp, "--revisions", "last:2", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["params"] == sum(v.numel() for v in runs["states"][4].values())  # from the metadata alone
    assert plan["download_bytes"] == 0
    out = tmp_path / "merged"
    common = ["--quiet", "--cache-dir", str(tmp_path / "cache")]
    assert main([fsdp, "--revisions", "last:2", "--method", "sma", "--no-eval", "--output", str(out), *common]) == 0
    assert main(["recipe", str(out / "bomerge_recipe.yaml"), "--output", str(tmp_path / "again"), *common]) == 0
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()


@pytest.mark.e2e
def test_a_watch_round_waits_for_metadata_then_merges(runs, tmp_path):
    from hf_bomerge.errors import WatchError
    from hf_bomerge.searching.watch import watch_once

    run = tmp_path / "run"
    shutil.copytree(runs["fsdp"], run)
    meta = run / "checkpoint-4" / "pytorch_model_fsdp_0" / ".metadata"
    saved = meta.read_bytes()
    meta.unlink()  # rank 0 is still writing: DCP writes .metadata last
    kwargs = dict(latest="checkpoint-4", window=2, trials=3, settle=0, poll=0.1, dataset=str(runs["heldout"]),
                  block_size=64, max_eval_tokens=512, device="cpu", cache_dir=str(tmp_path / "cache"),
                  save_dcp=True)
    with pytest.raises(WatchError, match=r"checkpoint-4: no \.metadata yet"):
        watch_once(str(run), run / "bomerge", wait=0.3, **kwargs)
    meta.write_bytes(saved)
    record = watch_once(str(run), run / "bomerge", wait=5, **kwargs)
    assert record["latest"] == "checkpoint-4" and record["revisions"] == ["checkpoint-3", "checkpoint-4"]
    assert (run / "bomerge" / "checkpoint-4" / "dcp" / ".metadata").is_file()


@pytest.mark.e2e
def test_hostile_metadata_through_the_command_line(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    shutil.copytree(runs["titan"], run)
    _hostile(run / "step-3", pickle.dumps(_System()))
    code = main([str(run), "--revisions", "step-3,step-4", "--weights", "0.5,0.5", "--no-eval", "--config",
                 str(runs["config"]), "--output", str(tmp_path / "x"), "--quiet", "--cache-dir", str(tmp_path / "c")])
    assert code == 2 and "unpickling it could run code" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "x").exists()


@pytest.mark.e2e
def test_a_key_map_file(runs, tmp_path, capsys):
    rules = tmp_path / "titan.keymap"
    rules.write_text("# torchtitan Llama, as a file\n" + BUILTIN["torchtitan-llama"])
    common = ["--revisions", "step-3,step-4", "--weights", "0.25,0.75", "--no-eval", "--config", str(runs["config"]),
              "--quiet", "--cache-dir", str(tmp_path / "c")]
    assert main([str(runs["titan"]), *common, "--key-map", str(rules), "--output", str(tmp_path / "file")]) == 0
    assert main([str(runs["titan"]), *common, "--output", str(tmp_path / "builtin")]) == 0
    assert (tmp_path / "file" / "model.safetensors").read_bytes() == (
        tmp_path / "builtin" / "model.safetensors").read_bytes()
    rules.write_text("tok_embeddings.weight model.embed_tokens.weight\n")
    assert main([str(runs["titan"]), *common, "--key-map", str(rules), "--output", str(tmp_path / "bad")]) == 2
    assert "line 1" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.mark.e2e
def test_a_trainer_runs_logged_learning_rate_reaches_the_phase_check(runs, tmp_path):
    """An FSDP Trainer run's checkpoint-N/trainer_state.json (beside pytorch_model_fsdp_0) is read as a folder's is:
    a logged decay gives the decay note's evidence."""
    import hf_bomerge

    run = tmp_path / "fsdp"
    shutil.copytree(runs["fsdp"], run)
    for k, step in enumerate((2, 3, 4)):
        history = [{"learning_rate": 1e-3 * (1 - 0.3 * i), "loss": 4.0, "step": i + 1} for i in range(k + 2)]
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    result = hf_bomerge.merge(str(run), "last:3", method="sma", evaluate=False, cache_dir=tmp_path / "cache",
                              progress=False)
    rates = result.phase.learning_rates
    assert result.phase.stage == "decay" and rates and rates[-1] < rates[0] and "trainer_state.json" in result.phase.evidence
