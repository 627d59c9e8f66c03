"""The trajectories of benchmarks/phase_bench.py: one run per learning-rate schedule, trained here on 2 CPU cores.

The demo's tiny Pythia-like GPT-NeoX (hf_bomerge.demo: same tokenizer training, config and optimizer) with more
held-out packages, trained with AdamW after a linear warmup under one of three schedules (the same seed, so the
same batches and the same weights until the schedules part):

- `constant`: the peak learning rate to the end (PMA's stable phase throughout);
- `cosine`: a cosine from the peak to 10% of it at the last step (Pythia's);
- `wsd`: warmup-stable-decay, constant until `decay_start`, then linear to zero at the last step (MiniCPM, WSM).

Each saves a checkpoint every `interval` steps (float32 safetensors, so no fp16 rounding enters the comparison),
with a `trainer_state.json` whose `log_history` carries the learning rate every 10 steps, as the HF Trainer's does.

    root/<schedule>/step50 … stepS/   the checkpoints (a folder source for hf-bomerge)
    root/heldout/search.jsonl          half the held-out documents (every other one, by path): what a search sees
    root/heldout/fresh.jsonl           the other half: fresh documents no search ever saw
    root/trajectory.json               parameters, train losses, timings (written last: marks completion)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from hf_bomerge import demo

HELDOUT = ["email", "http", "json", "xml", "urllib", "importlib", "multiprocessing", "asyncio"]
SCHEDULES = ("constant", "cosine", "wsd")
LOG_EVERY = 10  # the Trainer's logging_steps


def params(steps: int, interval: int, decay_start: int, seed: int) -> dict:
    p = {**demo.PARAMS, "seed": seed, "total_steps": steps, "interval": interval, "decay_start": decay_start,
         "heldout_packages": HELDOUT, "floor": 0.1}
    p.pop("steps")
    return p


def multiplier(schedule: str, step: int, p: dict) -> float:
    """The learning rate at `step` over the peak (1-based steps; warmup linear to 1 at `warmup_steps`)."""
    warm, total = p["warmup_steps"], p["total_steps"]
    if step <= warm:
        return step / warm
    if schedule == "cosine":
        t = (step - warm) / (total - warm)
        return p["floor"] + (1 - p["floor"]) * 0.5 * (1 + math.cos(math.pi * t))
    if schedule == "wsd" and step > p["decay_start"]:
        return (total - step) / (total - p["decay_start"])
    return 1.0


def build(out_root: Path, p: dict, log=print) -> Path:
    """Train (or find cached) the three runs for parameters `p`; return their folder."""
    import torch
    import transformers

    key = json.dumps([p, SCHEDULES, torch.__version__, transformers.__version__, demo.BUILD_VERSION], sort_keys=True)
    root = out_root / f"run-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    if (root / "trajectory.json").is_file():
        return root
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=out_root))
    try:
        _train(tmp, p, log)
        shutil.rmtree(root, ignore_errors=True)
        os.rename(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _save(folder: Path, model, tokenizer, history: list[dict], step: int) -> None:
    from safetensors.torch import save_file

    demo._save_common(folder, model, tokenizer)
    state = {k: v.detach().float().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    trainer_state = {"global_step": step, "logging_steps": LOG_EVERY, "log_history": list(history)}
    (folder / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")


def _train(out: Path, p: dict, log) -> None:
    import torch
    from transformers import GPTNeoXForCausalLM

    start = time.perf_counter()
    saved = demo.PARAMS["heldout_packages"]
    demo.PARAMS["heldout_packages"] = p["heldout_packages"]  # demo.corpus reads the held-out set from PARAMS
    try:
        tokenizer, data, _, heldout_files, ood = demo.corpus(p)
    finally:
        demo.PARAMS["heldout_packages"] = saved
    T, B, total, interval = p["max_position_embeddings"], p["batch_size"], p["total_steps"], p["interval"]
    config = demo.model_config(p, tokenizer.convert_tokens_to_ids(demo.EOS))
    config.architectures = ["GPTNeoXForCausalLM"]
    losses: dict[str, dict[str, float]] = {}
    for schedule in SCHEDULES:
        losses[schedule] = {}
        with torch.random.fork_rng():
            torch.manual_seed(p["seed"])
            model = GPTNeoXForCausalLM(config)
            gen = torch.Generator().manual_seed(p["seed"])
            opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], betas=tuple(p["betas"]),
                                    weight_decay=p["weight_decay"])
            model.train()
            recent: list[float] = []
            history: list[dict] = []
            for step in range(1, total + 1):
                lr = p["lr"] * multiplier(schedule, step, p)
                for group in opt.param_groups:
                    group["lr"] = lr
                recent = (recent + [demo.train_step(model, opt, data, gen, T, B)])[-interval:]
                if step % LOG_EVERY == 0:
                    history.append({"step": step, "learning_rate": lr, "loss": round(recent[-1], 4)})
                if step % interval == 0:
                    losses[schedule][f"step{step}"] = round(sum(recent) / len(recent), 4)
                    _save(out / schedule / f"step{step}", model, tokenizer, history, step)
            log(f"{schedule}: trained to step {total}, train loss {losses[schedule][f'step{total}']:.3f} "
                f"({time.perf_counter() - start:.0f} s)")
    _write_heldout(out / "heldout", heldout_files)
    meta = {"params": p, "schedules": list(SCHEDULES), "tokens_per_step": B * T, "train_loss": losses,
            "num_parameters": sum(x.numel() for x in model.parameters()), "train_tokens_available": len(data),
            "train_seconds": round(time.perf_counter() - start, 1), "python": sys.version.split()[0]}
    (out / "trajectory.json").write_text(json.dumps(meta, indent=2) + "\n")


def _write_heldout(held: Path, files: list[Path]) -> None:
    """Every other held-out document (sorted by path) to search.jsonl, the rest to fresh.jsonl: whole documents."""
    held.mkdir()
    lib = Path(os.__file__).parent
    parts = {"search": [], "fresh": []}
    for i, path in enumerate(sorted(files)):
        parts["search" if i % 2 == 0 else "fresh"].append({"text": demo._read(path),
                                                            "source": str(path.relative_to(lib))})
    for name, rows in parts.items():
        with open(held / f"{name}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
