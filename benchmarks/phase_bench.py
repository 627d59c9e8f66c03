"""Merging across learning-rate phases (issue 23, items 3 and 6; benchmarks/README.md, "Merging across LR phases").

    python benchmarks/phase_bench.py                 # seeds 0 and 1, the scan on seed 0: 30–45 min from scratch
    python benchmarks/phase_bench.py --seeds 0       # one training seed (3–10 min of it training, 14 min the rest)
    python benchmarks/phase_bench.py --seeds 0,1 --coarse-only --no-search   # only the widely spaced windows

1. Trains (benchmarks/phase_train.py, cached under benchmarks/out/phase/) the demo's tiny GPT-NeoX three times
   from the same seed: a constant learning rate, a cosine to 10% (Pythia's) and WSD (constant, then linear to 0
   over the last 20%), 1600 steps, a checkpoint every 50 with a trainer_state.json logging the learning rate.
2. Calibration scan (on the first seed; `--scan-seeds`): for windows of `--window` checkpoints ending every 100
   steps, and of 5 spaced 200 and 300 steps, what hf_bomerge.reading.phase measures (the fitted update-norm
   ratio, the logged learning-rate ratio, the largest cosine of consecutive updates, the stage it gives with and
   without the learning-rate log) beside the uniform average's gain over the window's latest checkpoint on FRESH
   documents (held-out documents no search sees), measured independently: a float64 merge in plain torch and
   transformers' own forward.
3. The product: for each schedule, `hf_bomerge.search` (the GP, its confirm verdict) on three windows (ending at
   850, 1250 — WSD's last stable one — and 1600), with the search's held-out set = the other half of the held-out
   documents. On the fresh documents: the merge's gain over the latest checkpoint, over uniform and over the
   confirm part's best baseline (with a bootstrap interval over documents), and whether the verdict agreed.
Writes the markdown to stdout and benchmarks/out/phase_bench-SEEDS.md, the numbers to phase_bench-SEEDS.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import measure  # noqa: E402  (tests/measure.py: no hf_bomerge inside)
import phase_train  # noqa: E402
from cpu import cpu_model  # noqa: E402

import hf_bomerge  # noqa: E402
from hf_bomerge.merging import weights as W  # noqa: E402
from hf_bomerge.reading import phase  # noqa: E402
from hf_bomerge.reading.checkpoints import CheckpointSet  # noqa: E402

BLOCK = 128
BLOCKS_PER_DOC = 16  # fresh documents: at most this many blocks each, so long files do not dominate
SEARCH_TOKENS = 32768
SEARCH_ENDS = (850, 1250, 1600)


def log(msg: str) -> None:
    print(f"[phase_bench] {msg}", file=sys.stderr, flush=True)


class Fresh:
    """Per-block losses on the fresh documents of saved checkpoints and float64 merges of them, measured with plain
    torch and transformers (nothing of hf_bomerge)."""

    def __init__(self, root: Path, latest: Path):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(latest)
        blocks, docs = [], []
        for d, line in enumerate(open(root / "heldout" / "fresh.jsonl")):
            ids = tokenizer(json.loads(line)["text"])["input_ids"] + [tokenizer.eos_token_id]
            n = min(len(ids) // BLOCK, BLOCKS_PER_DOC)
            blocks += [ids[i * BLOCK:(i + 1) * BLOCK] for i in range(n)]
            docs += [d] * n
        self.blocks, self.docs, self.states = torch.tensor(blocks), docs, {}
        self.config = latest

    def state(self, folder: Path) -> dict:
        if folder not in self.states:
            self.states[folder] = measure.load_state(folder)
        return self.states[folder]

    def losses(self, folders: list[Path], weights: list[float]) -> list[float]:
        """Per-block mean token NLL of Σ wᵢθᵢ (float64 sum, rounded to float32)."""
        from transformers import AutoModelForCausalLM

        states = [self.state(f) for f in folders]
        merged = {k: sum(w * s[k].double() for w, s in zip(weights, states) if w).float()
                  for k in states[-1] if states[-1][k].is_floating_point()}
        model = AutoModelForCausalLM.from_pretrained(folders[-1], dtype=torch.float32).eval()
        model.load_state_dict(merged, strict=False)
        out = []
        with torch.no_grad():
            for batch in self.blocks.split(64):
                logits = model(input_ids=batch).logits[:, :-1].float()
                nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
                out += nll.mean(dim=1).tolist()
        return out

    def mean(self, losses: list[float]) -> float:
        return sum(losses) / len(losses)

    def interval(self, a: list[float], b: list[float], samples: int = 2000) -> tuple[float, float]:
        """95% bootstrap interval of mean(a − b), resampling whole documents."""
        by_doc: dict[int, list[float]] = {}
        for d, x, y in zip(self.docs, a, b):
            by_doc.setdefault(d, []).append(x - y)
        groups, rng, draws = list(by_doc.values()), random.Random(0), []
        for _ in range(samples):
            pick = [groups[rng.randrange(len(groups))] for _ in groups]
            draws.append(sum(map(sum, pick)) / sum(map(len, pick)))
        draws.sort()
        return draws[int(0.025 * samples)], draws[int(0.975 * samples) - 1]


def window(end: int, n: int, interval: int) -> list[str]:
    return [f"step{s}" for s in range(end - (n - 1) * interval, end + 1, interval)]


def measured_phase(root: Path, schedule: str, revs: list[str]) -> dict:
    folders = [root / schedule / r for r in revs]
    found = phase.measure(CheckpointSet(folders, revs), labels=revs, folders=folders)
    unlogged = phase.Phase(found.changes, found.cosines, found.updates, found.positions, found.jumps, None)
    return {"update_ratio": found.update_ratio, "lr_ratio": found.lr_ratio, "max_cosine": max(found.cosines),
            "stage": phase.verdict(found, revs).stage, "stage_unlogged": phase.verdict(unlogged, revs).stage,
            "jumps": [j.revision for j in found.jumps]}


def scan(root: Path, fresh: Fresh, args) -> list[dict]:
    rows, singles = [], {}
    for schedule in phase_train.SCHEDULES:
        for end in range(args.interval * args.window, args.steps + 1, 100):
            revs = window(end, args.window, args.interval)
            folders = [root / schedule / r for r in revs]
            key = (schedule, revs[-1])
            if key not in singles:
                singles[key] = fresh.mean(fresh.losses(folders[-1:], [1.0]))
            sma = fresh.mean(fresh.losses(folders, W.uniform(len(folders))))
            rows.append({"schedule": schedule, "window": f"{revs[0]}..{revs[-1]}", "latest": singles[key],
                         "sma": sma, "gain": singles[key] - sma, **measured_phase(root, schedule, revs)})
            r = rows[-1]
            log(f"scan {schedule} {r['window']}: gain {r['gain']:+.4f}, update ratio {r['update_ratio']:.2f}, "
                f"lr ratio {r['lr_ratio']:.2f}, max cos {r['max_cosine']:+.3f}, {r['stage']}")
    return rows


def coarse(root: Path, fresh: Fresh, args) -> list[dict]:
    """Windows of 5 checkpoints spaced 4 and 6 intervals apart, ending at the last step: where drift, not noise,
    dominates each update (the early check's cosine rises with spacing)."""
    rows = []
    for schedule in phase_train.SCHEDULES:
        for every in (4, 6):
            revs = window(args.steps, 5, every * args.interval)
            folders = [root / schedule / r for r in revs]
            latest = fresh.mean(fresh.losses(folders[-1:], [1.0]))
            sma = fresh.mean(fresh.losses(folders, W.uniform(len(folders))))
            rows.append({"schedule": schedule, "window": f"{revs[0]}..{revs[-1]} every {every * args.interval}",
                         "latest": latest, "sma": sma, "gain": latest - sma, **measured_phase(root, schedule, revs)})
            log(f"coarse {schedule} {rows[-1]['window']}: {rows[-1]}")
    return rows


def searches(root: Path, fresh: Fresh, args, seed: int) -> list[dict]:
    rows = []
    for schedule in phase_train.SCHEDULES:
        for end in SEARCH_ENDS:
            revs = window(end, args.window, args.interval)
            folders = [root / schedule / r for r in revs]
            t0 = time.perf_counter()
            result = hf_bomerge.search(str(root / schedule), ",".join(revs), max_checkpoints=0,
                                       dataset=str(root / "heldout" / "search.jsonl"), trials=args.trials,
                                       max_eval_tokens=SEARCH_TOKENS, eval_dtype="float32", device="cpu", seed=seed,
                                       cache_dir=root / "cache", progress=False)
            seconds = time.perf_counter() - t0
            c = result.confirm
            seeds = {r: W.one_hot(len(revs), i) for i, r in enumerate(revs)}
            seeds |= {"uniform": W.uniform(len(revs)), "ema": W.ema(len(revs), 0.2)}
            merged = fresh.losses(folders, result.weights)
            best = fresh.losses(folders, seeds[c.best_baseline]) if c else merged
            latest, uniform = fresh.losses(folders[-1:], [1.0]), fresh.losses(folders, seeds["uniform"])
            lo, hi = fresh.interval(merged, best)
            rows.append({"seed": seed, "schedule": schedule, "window": f"{revs[0]}..{revs[-1]}",
                         "stage": result.phase.stage if result.phase else None,
                         "verdict": c.verdict if c else None, "confirm_units": c.units if c else 0,
                         "best_baseline": c.best_baseline if c else None, "confirm_delta": c.delta if c else None,
                         "confirm_interval": list(c.interval) if c and c.interval else None,
                         "fresh_vs_latest": fresh.mean(latest) - fresh.mean(merged),
                         "fresh_vs_uniform": fresh.mean(uniform) - fresh.mean(merged),
                         "fresh_vs_best": fresh.mean(best) - fresh.mean(merged), "fresh_interval": [lo, hi],
                         "weights": [round(w, 4) for w in result.weights], "seconds": round(seconds, 1)})
            r = rows[-1]
            log(f"search {schedule} {r['window']} (seed {seed}, {seconds:.0f} s): {r['stage']}, verdict "
                f"{r['verdict']!r} vs {r['best_baseline']}; fresh gain over latest {r['fresh_vs_latest']:+.4f}, "
                f"over uniform {r['fresh_vs_uniform']:+.4f}, over {r['best_baseline']} {r['fresh_vs_best']:+.4f}")
    return rows


def machine() -> str:
    import transformers

    return (f"{cpu_model()}, {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f} at the end), Python "
            f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")


def report(scans: dict, rows: list[dict], args, seconds: float) -> str:
    lines = [f"`python benchmarks/phase_bench.py --seeds {args.seeds}` — {machine()}; {seconds / 60:.1f} min wall.",
             "", "Gains are in nats/token on fresh documents (positive: the merge is better); the GP's verdict is its "
             "confirm part's against its best baseline.", "",
             "| seed | schedule | window | stage (tool) | verdict (confirm) | best baseline | fresh: vs latest | "
             "vs uniform | vs best baseline [95% by document] | verdict right |",
             "| ---: | --- | --- | --- | --- | --- | ---: | ---: | --- | --- |"]
    for r in rows:
        lo, hi = r["fresh_interval"]
        # "better" is right where the merge beats that baseline on fresh documents; any other verdict, where the
        # fresh documents do not show a clear win (their interval excludes 0 in the merge's favour)
        right = "yes" if (r["fresh_vs_best"] > 0 if r["verdict"] == "better" else not hi < 0) else "no"
        lines.append(f"| {r['seed']} | {r['schedule']} | {r['window']} | {r['stage']} | {r['verdict']} | "
                     f"{r['best_baseline']} | {r['fresh_vs_latest']:+.4f} | {r['fresh_vs_uniform']:+.4f} | "
                     f"{r['fresh_vs_best']:+.4f} [{-hi:+.4f}, {-lo:+.4f}] | {right} |")
    said = [r for r in rows if r["verdict"] == "better"]
    lines += ["", f"\"better\" said {len(said)} times of {len(rows)}; right (the merge beat that baseline on fresh "
              f"documents) {sum(r['fresh_vs_best'] > 0 for r in said)} times.", ""]
    for seed, rows_ in scans.items():
        lines += [f"Calibration scan, seed {seed}: windows of {args.window} checkpoints (5 where spaced wider); "
                  "gain = latest − uniform "
                  "average on fresh documents; update ratio = hf_bomerge.reading.phase's fitted update norm at the "
                  f"window's end over its start (a decay below {phase.SHRUNK}); lr ratio = trainer_state.json's "
                  f"(below {phase.LR_DECAYED}); max cos (early above {phase.ALIGNED}).", "",
                  "| schedule | window | gain | update ratio | lr ratio | max cos | stage | stage without the LR log |",
                  "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |"]
        lines += [f"| {s['schedule']} | {s['window']} | {s['gain']:+.4f} | {s['update_ratio']:.2f} | "
                  f"{s['lr_ratio']:.2f} | {s['max_cosine']:+.3f} | {s['stage']} | {s['stage_unlogged']} |"
                  for s in rows_]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1", help="training seeds, comma-separated (default 0,1)")
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--interval", type=int, default=50)
    parser.add_argument("--decay-start", type=int, default=1280, help="WSD's decay start (default 1280)")
    parser.add_argument("--window", type=int, default=8, help="checkpoints per window (default 8)")
    parser.add_argument("--trials", type=int, default=20, help="the GP's budget, seeds included (default 20)")
    parser.add_argument("--no-search", action="store_true", help="the calibration scan only")
    parser.add_argument("--coarse-only", action="store_true", help="only the coarsely spaced scan windows")
    parser.add_argument("--scan-seeds", default=None, help="seeds to scan (default: the first of --seeds; '' for none)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # 2 threads on a loaded 2-core box ran a training step ~10× slower (measured)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("hf_bomerge").setLevel(logging.ERROR)  # the phase notes would flood the scan
    start = time.perf_counter()
    scans, rows = {}, []
    scanned = args.seeds.split(",")[0] if args.scan_seeds is None else args.scan_seeds
    for seed in [int(s) for s in args.seeds.split(",")]:
        p = phase_train.params(args.steps, args.interval, args.decay_start, seed)
        root = phase_train.build(OUT / "phase", p, log)
        fresh = Fresh(root, root / "constant" / f"step{args.steps}")
        if str(seed) in scanned.split(","):
            scans[seed] = ([] if args.coarse_only else scan(root, fresh, args)) + coarse(root, fresh, args)
        if not args.no_search:
            rows += searches(root, fresh, args, seed)
    text = report(scans, rows, args, time.perf_counter() - start)
    OUT.mkdir(exist_ok=True)
    name = f"phase_bench-{args.seeds.replace(',', '_')}" + ("-coarse" if args.coarse_only else "")
    (OUT / f"{name}.md").write_text(text + "\n")
    (OUT / f"{name}.json").write_text(json.dumps({"scans": scans, "searches": rows}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
