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
    from transformers import GPTNeoXForCausalLM

    start = time.perf_counter()
    tokenizer, data, _, heldout_files, ood = demo.corpus(p)
    T, B = p["max_position_embeddings"], p["batch_size"]
    config = demo.model_config(p, tokenizer.convert_tokens_to_ids(demo.EOS))
    config.architectures = ["GPTNeoXForCausalLM"]
    total, interval, decay = p["total_steps"], p["interval"], p["decay_steps"]
    branch = total - decay
    losses: dict[str, dict[str, float]] = {"constant": {}, "annealed": {}}

    def run(model, opt, gen, first: int, last: int, lr_mult, name: str) -> None:
        recent: list[float] = []
        for step in range(first, last + 1):
            for group in opt.param_groups:
                group["lr"] = p["lr"] * lr_mult(step)
            recent = (recent + [demo.train_step(model, opt, data, gen, T, B)])[-interval:]
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
    demo.write_heldout(out / "heldout", heldout_files, ood)
    meta = {"params": p, "branch_step": branch, "tokens_per_step": B * T, "train_loss": losses,
            "num_parameters": sum(x.numel() for x in model.parameters()),
            "train_tokens_available": len(data), "train_seconds": round(time.perf_counter() - start, 1),
            "python": sys.version.split()[0]}
    (out / "trajectory.json").write_text(json.dumps(meta, indent=2) + "\n")
