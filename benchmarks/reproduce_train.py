"""The trajectories of benchmarks/reproduce.py: one constant-LR run and an annealed fork, trained here.

The demo's tiny Pythia-like GPT-NeoX (hf_bomerge.demo: same tokenizer training, data, config and optimizer) is
trained with AdamW, linear warmup, then a constant learning rate, saving a checkpoint every `interval` steps
(float32 safetensors, so no fp16 rounding enters the comparison). At step `steps - decay_steps` the model,
the optimizer and the data generator are copied: the fork trains the same batches with the learning rate decayed
linearly to zero at `steps`, so both runs see exactly the same tokens.

    root/constant/step50 … stepS/      the constant-LR checkpoints (a folder source for hf-bomerge)
    root/annealed/stepS/               the annealed fork's last checkpoint (+ its intermediate ones)
    root/heldout/validation.jsonl, ood.jsonl   the demo's in-domain held-out code and out-of-domain prose
    root/trajectory.json               parameters, train losses, timings (written last: marks completion)
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from hf_bomerge import demo


def params(steps: int, interval: int, decay_steps: int, seed: int) -> dict:
    p = {**demo.PARAMS, "seed": seed, "total_steps": steps, "interval": interval, "decay_steps": decay_steps}
    p.pop("steps")
    return p


def build(out_root: Path, p: dict, log=print) -> Path:
    """Train (or find cached) the two runs for parameters `p`; return their folder."""
    import torch
    import transformers

    key = json.dumps([p, torch.__version__, transformers.__version__, demo.BUILD_VERSION], sort_keys=True)
    root = out_root / f"run-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    if (root / "trajectory.json").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=out_root))
    try:
        _train(tmp, p, log)
        os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _save(folder: Path, model, tokenizer) -> None:
    from safetensors.torch import save_file

    demo._save_common(folder, model, tokenizer)
    state = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def _train(out: Path, p: dict, log) -> None:
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    start = time.perf_counter()
    train_files, heldout_files, ood = demo._stdlib_texts()
    texts = [demo._read(f) for f in train_files]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=p["vocab_size"], min_frequency=2, special_tokens=[demo.EOS],
                            show_progress=False)
    T, B = p["max_position_embeddings"], p["batch_size"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=demo.EOS, eos_token=demo.EOS,
                                        unk_token=demo.EOS)
    eos_id = tokenizer.convert_tokens_to_ids(demo.EOS)
    data = torch.tensor([i for e in bpe.encode_batch(texts) for i in e.ids + [eos_id]])
    config = GPTNeoXConfig(
        vocab_size=p["vocab_size"], hidden_size=p["hidden_size"], num_hidden_layers=p["num_hidden_layers"],
        num_attention_heads=p["num_attention_heads"], intermediate_size=4 * p["hidden_size"],
        max_position_embeddings=T, rotary_pct=p["rotary_pct"], rotary_emb_base=10000, tie_word_embeddings=False,
        use_parallel_residual=True, bos_token_id=eos_id, eos_token_id=eos_id, hidden_act="gelu",
    )
    config.architectures = ["GPTNeoXForCausalLM"]
    total, interval, decay = p["total_steps"], p["interval"], p["decay_steps"]
    branch = total - decay
    losses: dict[str, dict[str, float]] = {"constant": {}, "annealed": {}}

    def run(model, opt, gen, first: int, last: int, lr_mult, name: str) -> None:
        recent: list[float] = []
        for step in range(first, last + 1):
            for group in opt.param_groups:
                group["lr"] = p["lr"] * lr_mult(step)
            idx = torch.randint(0, len(data) - T, (B,), generator=gen)
            batch = torch.stack([data[i: i + T] for i in idx.tolist()])
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            recent = (recent + [loss.item()])[-interval:]
            if step % interval == 0:
                losses[name][f"step{step}"] = round(sum(recent) / len(recent), 4)
                _save(out / name / f"step{step}", model, tokenizer)
                if step % (4 * interval) == 0 or step == last:
                    log(f"{name} step{step}: train loss {losses[name][f'step{step}']:.3f} "
                        f"({time.perf_counter() - start:.0f} s)")

    warm = p["warmup_steps"]

    def constant(step: int) -> float:
        return min(1.0, step / warm)

    def annealed(step: int) -> float:  # linear to zero: the last step of the fork takes lr/decay
        return (total - step + 1) / (decay + 1) if step > branch else constant(step)

    with torch.random.fork_rng():
        torch.manual_seed(p["seed"])
        model = GPTNeoXForCausalLM(config)
        gen = torch.Generator().manual_seed(p["seed"])
        opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], betas=tuple(p["betas"]),
                                weight_decay=p["weight_decay"])
        model.train()
        run(model, opt, gen, 1, branch, constant, "constant")
        fork_model, fork_opt = copy.deepcopy(model), None
        fork_opt = torch.optim.AdamW(fork_model.parameters(), lr=p["lr"], betas=tuple(p["betas"]),
                                     weight_decay=p["weight_decay"])
        fork_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        fork_gen = torch.Generator()
        fork_gen.set_state(gen.get_state())
        run(model, opt, gen, branch + 1, total, constant, "constant")
        run(fork_model, fork_opt, fork_gen, branch + 1, total, annealed, "annealed")
    held = out / "heldout"
    held.mkdir()
    lib = Path(os.__file__).parent
    with open(held / "validation.jsonl", "w") as f:
        for path in heldout_files:
            f.write(json.dumps({"text": demo._read(path), "source": str(path.relative_to(lib))}) + "\n")
    with open(held / "ood.jsonl", "w") as f:
        for name, text in ood:
            f.write(json.dumps({"text": text, "source": f"pydoc_data.topics:{name}"}) + "\n")
    meta = {"params": p, "branch_step": branch, "tokens_per_step": B * T, "train_loss": losses,
            "num_parameters": sum(x.numel() for x in model.parameters()),
            "train_tokens_available": len(data), "train_seconds": round(time.perf_counter() - start, 1),
            "python": sys.version.split()[0]}
    (out / "trajectory.json").write_text(json.dumps(meta, indent=2) + "\n")
