"""A search trial at real sizes, measured and predicted (see benchmarks/README.md, "Trial time").

    python benchmarks/trial_bench.py --shape 160m [--trials 2] [--max-eval-tokens 16384] [--device cpu|cuda]

Builds N=4 fp16 safetensors checkpoints of a Pythia-shaped GPT-NeoX (random weights: this is about time, not
loss), a word-level tokenizer of the same vocabulary and a held-out text file, then runs what a search runs:
`prepare` + the `Evaluator` (model loaded, checkpoints resident, held-out blocks tokenized), and times
`evaluator(weights)` (re-merge + forward over the search part of the held-out tokens) `--trials` times, and
`ResidentMerger.apply` alone. The dry-run estimate (`hf_bomerge.estimate`, both calibrations: a one-layer model
of the config, a matmul probe) is computed in the same process, before the model is loaded, and compared.
Everything is built under benchmarks/out/ (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the hf-bomerge command sets it, before torch loads
import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
SHAPES = {  # Pythia's published shapes: hidden, layers, heads, intermediate
    "70m": (512, 6, 8, 2048), "160m": (768, 12, 12, 3072), "410m": (1024, 24, 16, 4096),
    "1b": (2048, 16, 8, 8192), "1.4b": (2048, 24, 16, 8192),
}
VOCAB, CTX, N = 50304, 2048, 4


def log(msg: str) -> None:
    print(f"[trial_bench] {msg}", file=sys.stderr, flush=True)


def config_for(shape: str) -> dict:
    hidden, layers, heads, inter = SHAPES[shape]
    return {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "bos_token_id": 0, "eos_token_id": 0,
            "hidden_act": "gelu", "hidden_size": hidden, "intermediate_size": inter, "layer_norm_eps": 1e-5,
            "max_position_embeddings": CTX, "num_attention_heads": heads, "num_hidden_layers": layers,
            "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False, "torch_dtype": "float16",
            "use_parallel_residual": True, "vocab_size": VOCAB}


def build(shape: str) -> Path:
    """N checkpoints (random fp16 under the model's own names), tokenizer, held-out text; cached."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM

    root = OUT / f"trial-{shape}"
    config = config_for(shape)
    words = [f"w{i}" for i in range(VOCAB - 1)]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    names = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for step in range(1, N + 1):
        folder = root / f"step{step}000"
        if (folder / "model.safetensors").is_file():
            continue
        log(f"building {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(step)
        state = {n: (torch.randn(s, generator=g) * 0.02 + (1.0 if "norm" in n and n.endswith("weight") else 0.0)).half()
                 for n, s in names.items()}
        save_file(state, folder / "tmp.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        (folder / "tmp.safetensors").rename(folder / "model.safetensors")
    tok = root / f"step{N}000"
    if not (tok / "tokenizer.json").is_file():
        t = Tokenizer(models.WordLevel({"<|endoftext|>": 0, **{w: i + 1 for i, w in enumerate(words)}},
                                       unk_token="<|endoftext|>"))
        t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        t.save(str(tok / "tokenizer.json"))
        (tok / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}))
    text = OUT / "trial-heldout.txt"
    if not text.is_file():
        rng = random.Random(0)
        text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(200)) for _ in range(1000)) + "\n")
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=SHAPES, default="160m")
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--max-eval-tokens", type=int, default=16384)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--eval-dtype", default=None)
    a = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    root = build(a.shape)
    os.environ.setdefault("HF_BOMERGE_CACHE", str(OUT / "cache"))

    from hf_bomerge.estimate import estimate
    from hf_bomerge.prepare import prepare
    from hf_bomerge.specs import EvalSpec, SourceSpec

    load0 = os.getloadavg()
    spec = EvalSpec.from_options(str(OUT / "trial-heldout.txt"), max_eval_tokens=a.max_eval_tokens,
                                 batch_size=a.batch_size, eval_dtype=a.eval_dtype, device=a.device)
    prep = prepare(str(root), f"step1000..step{N}000", 0, None, None, False, planning=spec.planning())
    params = sum(i.numel for i in prep.ckpts.infos.values())
    config = json.loads((prep.folders[-1] / "config.json").read_text())
    estimates = {}
    for method in ("model", "matmul"):
        t = time.perf_counter()
        e = estimate(config, params, n_checkpoints=N, device=a.device, eval_dtype=a.eval_dtype, stored_itemsize=2,
                     batch_size=a.batch_size, block_size=None, max_eval_tokens=a.max_eval_tokens, trials=1)
        estimates[method] = (e, time.perf_counter() - t)
        log(f"estimate ({method}): trial {e.trial_s:.2f} s (merge {e.merge_s:.2f}, forward {e.forward_s:.2f}), "
            f"{e.flop_rate / 1e9:.1f} GFLOP/s, calibration {estimates[method][1]:.1f} s")
    t = time.perf_counter()
    evaluator = spec.evaluator(prep, OUT / "cache", SourceSpec(str(root)))
    setup = time.perf_counter() - t
    sync = (lambda: torch.cuda.synchronize()) if a.device.startswith("cuda") else (lambda: None)
    weights = [0.1, 0.2, 0.3, 0.4]
    trials, applies = [], []
    for i in range(a.trials + 1):  # the first trial faults the mapped checkpoints in: reported apart
        t = time.perf_counter(); loss = evaluator(weights); sync(); trials.append(time.perf_counter() - t)
        log(f"trial {i}: {trials[-1]:.2f} s (loss {loss:.3f})")
        t = time.perf_counter(); evaluator.merger.apply(weights); sync(); applies.append(time.perf_counter() - t)
    trial, apply = statistics.median(trials[1:]), statistics.median(applies[1:])
    tokens = evaluator.objective.tokens
    load1 = os.getloadavg()
    rows = [f"| {m} | {e.trial_s:.2f} | {e.merge_s:.2f} | {e.forward_s:.2f} | {e.flop_rate / 1e9:.1f} | {c:.1f} | "
            f"{trial / e.trial_s:.2f} |" for m, (e, c) in estimates.items()]
    md = "\n".join([
        f"Shape: Pythia-{a.shape} (GPT-NeoX, {params / 1e6:.0f} M parameters, N={N} fp16 checkpoints, random "
        f"weights); device {a.device}, eval dtype {evaluator.eval_dtype}; {tokens} search tokens "
        f"(--max-eval-tokens {a.max_eval_tokens}, confirm part 1/4 held apart), batch {a.batch_size} × "
        f"{evaluator.block_size}; torch {torch.__version__}, {os.cpu_count()} CPUs.",
        f"Measured: trial (re-merge + forward) median {trial:.2f} s over {a.trials} "
        f"({', '.join(f'{x:.2f}' for x in trials[1:])}; first {trials[0]:.2f} s), re-merge alone "
        f"{apply:.3f} s, forward {trial - apply:.2f} s = {tokens / (trial - apply):.0f} tokens/s; setup (model load, "
        f"tokenize) {setup:.1f} s.", "",
        "| calibration | estimated trial s | re-merge s | forward s | GFLOP/s | calibration s | measured / estimated |",
        "| --- | --- | --- | --- | --- | --- | --- |", *rows, "",
        f"Load average (1 min) before / after: {load0[0]:.2f} / {load1[0]:.2f}.",
    ])
    print(md)
    (OUT / f"trial_bench-{a.shape}-{a.device}.md").write_text(md + "\n")


if __name__ == "__main__":
    main()
