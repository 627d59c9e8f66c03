"""`--dry-run` estimates the time of a trial and of the search, calibrated on the device from config.json."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_bomerge.cli import main
from hf_bomerge.estimate import estimate, flops_per_token

pytestmark = pytest.mark.e2e  # the test Hub, subprocess CLIs, real searches or training


@pytest.fixture
def run_folder(tmp_path):
    config = AutoConfig.for_model("gpt_neox", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, vocab_size=96, max_position_embeddings=64)
    for step in (1, 2, 3):
        torch.manual_seed(step)
        AutoModelForCausalLM.from_config(config).half().save_pretrained(tmp_path / "run" / f"step{step}")
    (tmp_path / "run" / "tokenizer_config.json").write_text("{}")
    return tmp_path / "run"


def _plan(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_dry_run_json_has_the_trial_and_search_estimate(run_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_BOMERGE_CACHE", str(tmp_path / "cache"))
    args = [str(run_folder), "--revisions", "step1..step3", "--dry-run", "--device", "cpu", "--max-eval-tokens", "512"]
    assert main([*args, "--json", "--trials", "7"]) == 0
    est = _plan(capsys)["estimate"]
    assert est["trials"] == 7 and est["trial_s"] > 0 and est["merge_s"] > 0 and est["forward_s"] > 0
    assert est["trial_s"] == pytest.approx(est["merge_s"] + est["forward_s"])
    # 512 tokens in blocks of 64 = 8 blocks: every 4th (2) kept for the confirm part, 6 searched
    assert (est["search_tokens"], est["confirm_tokens"]) == (384, 128)
    assert est["search_s"] >= 7 * est["trial_s"]
    assert "one-layer model" in est["calibration"]
    assert main(args) == 0
    assert "per trial on this device" in capsys.readouterr().out
    # a fixed merge without evaluation has no trial to time
    fixed = args[:-2]  # --max-eval-tokens with --no-eval is refused as a conflict (it would not be used)
    assert main([*fixed, "--json", "--weights", "0.2,0.3,0.5", "--no-eval"]) == 0
    assert _plan(capsys)["estimate"] is None


def test_estimate_scales_with_the_tokens_and_falls_back_to_the_matmul_probe():
    config = {"model_type": "gpt_neox", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 128,
              "num_attention_heads": 4, "intermediate_size": 256, "max_position_embeddings": 64}
    kw = dict(n_checkpoints=3, device="cpu", eval_dtype=None, stored_itemsize=2, batch_size=4, block_size=None,
              trials=10, confirm_fraction=0.0)
    remote = estimate({**config, "auto_map": {"AutoModelForCausalLM": "x.Y"}}, 200_000, max_eval_tokens=640, **kw)
    assert remote.calibration.startswith("a matmul probe") and remote.search_tokens == 640
    # the forward is the FLOPs of the tokens at the calibrated rate: ten times the tokens, ten times the time
    assert remote.forward_s == pytest.approx(flops_per_token(config, 200_000, 64) * 640 / remote.flop_rate)
    assert flops_per_token(config, 200_000, 64) == 2 * (200_000 - 128 * 64) + 2 * 2 * 64 * 64
