"""The fixed-merge shortcut: for the architectures in SUFFIX_RULE_ARCHITECTURES the name rule is exactly the
rule of the model's parameters, so `rule_from_config` may skip building the model (and importing transformers)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_bomerge.merging import engine
from hf_bomerge.reading.checkpoints import SUFFIX_RULE_ARCHITECTURES, CheckpointSet, suffix_rule_suffices

TYPES = {"GPTNeoXForCausalLM": "gpt_neox", "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
         "Qwen2ForCausalLM": "qwen2", "OlmoForCausalLM": "olmo", "Olmo2ForCausalLM": "olmo2"}


def test_every_listed_architecture_is_checked():
    assert set(TYPES) == SUFFIX_RULE_ARCHITECTURES


@pytest.mark.parametrize("architecture", sorted(SUFFIX_RULE_ARCHITECTURES))
def test_name_rule_equals_the_model_rule(tmp_path, architecture):
    config = AutoConfig.for_model(TYPES[architecture], hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=2, vocab_size=64,
                                  max_position_embeddings=32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path)  # what transformers writes: parameters and persistent buffers
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [architecture]
    assert suffix_rule_suffices(tmp_path)
    shortcut = CheckpointSet([tmp_path])
    assert engine.rule_from_config(shortcut, tmp_path)  # takes the shortcut
    built = CheckpointSet([tmp_path])
    engine.model_rule(model, built)
    assert shortcut.copied == built.copied
    assert shortcut.merged_names == built.merged_names


def test_remote_code_and_unknown_architectures_build_the_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "auto_map": {}}))
    assert not suffix_rule_suffices(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BaichuanForCausalLM"]}))
    assert not suffix_rule_suffices(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({}))
    assert not suffix_rule_suffices(tmp_path)


def test_fixed_merge_without_eval_imports_no_transformers_optuna_or_datasets(tmp_path):
    """The measured start-up lever (benchmarks/README.md): `--no-eval` fixed merges need torch only."""
    import subprocess
    import sys

    config = AutoConfig.for_model("gpt_neox", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, vocab_size=64, max_position_embeddings=32)
    for step in (1, 2):
        torch.manual_seed(step)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "run" / f"step{step}")
    (tmp_path / "run" / "tokenizer_config.json").write_text("{}")  # the folder's tokenizer (copied, never loaded)
    code = ("import sys; from hf_bomerge.cli import main; rc = main(sys.argv[1:]); "
            "print(sorted(m for m in ('transformers', 'optuna', 'datasets', 'sqlalchemy', 'scipy', 'matplotlib') "
            "if m in sys.modules)); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run"), "--revisions", "step1,step2",
                          "--weights", "0.5,0.5", "--no-eval", "--quiet", "--output", str(tmp_path / "out")],
                         capture_output=True, text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1",
                                                              "HF_BOMERGE_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "model.safetensors").is_file()
