"""Reproduce the papers' claims on trajectories trained here (benchmarks/README.md, "Reproducing the papers").

    python benchmarks/reproduce.py              # two seeds: about 14 minutes on 2 loaded CPU cores, 10 once trained
    python benchmarks/reproduce.py --seeds 0    # one training run

1. Trains (benchmarks/reproduce_train.py, cached under benchmarks/out/reproduce/) the demo's tiny GPT-NeoX on
   CPython's stdlib at a constant learning rate after warmup, a checkpoint every 50 steps to step 1200, and an
   annealed fork from step 1000: the same batches with the learning rate decayed linearly to zero at step 1200.
2. Merges the constant-LR checkpoints with hf-bomerge's Python API: `hf_bomerge.merge` for SMA/EMA/WMA and WSM's
   decay-emulating weights (`method="wsm-linear"|"wsm-cosine"`, `window` in steps), `hf_bomerge.search` for the GP
   merge; each saved with `save_pretrained`.
3. Measures every saved model independently of hf-bomerge: transformers' own `labels=` loss of packed blocks
   (tests/measure.py's `document_blocks`), on the in-domain held-out code (all blocks, and the confirm part the
   GP never saw: every 4th block) and on out-of-domain English prose.
4. PMA's early-training effect: SMA of a window ending early (weights still moving fast) vs late, against the
   window's latest checkpoint, with hf_bomerge.reading.phase's statistic for each window (the warning's calibration).
Writes the markdown to stdout and benchmarks/out/reproduce.md, the numbers to benchmarks/out/reproduce.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
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
import reproduce_train  # noqa: E402
from cpu import cpu_model  # noqa: E402

import hf_bomerge  # noqa: E402
from hf_bomerge.reading import phase  # noqa: E402
from hf_bomerge.reading.checkpoints import CheckpointSet  # noqa: E402

MAX_TOKENS = 32768  # 256 blocks of 128 tokens per set; the confirm part is 64 of them


def log(msg: str) -> None:
    print(f"[reproduce] {msg}", file=sys.stderr, flush=True)


def trapezoid(n: int) -> list[float]:
    """WSM-linear's weights for n evenly spaced checkpoints over a window spanning them: (½, 1, …, 1, ½)/(n − 1).
    Σ cᵢθᵢ = θ₁ + Σₖ Mₖ Δₖ with Mₖ = Σ_{i>k} cᵢ the learning-rate multiplier of the update Δₖ = θₖ₊₁ − θₖ; a linear
    decay of M over the window gives these (hf_bomerge.merging.schedules derives the general case)."""
    return [0.5 / (n - 1)] + [1 / (n - 1)] * (n - 2) + [0.5 / (n - 1)]


class Meter:
    """Per-block losses of saved models, measured with plain transformers on fixed blocks of each text set."""

    def __init__(self, root: Path, tokenizer_folder: Path):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
        self.blocks = {}
        for name in ("validation", "ood"):
            rows = [json.loads(line)["text"] for line in open(root / "heldout" / f"{name}.jsonl")]
            self.blocks[name] = measure.document_blocks(rows, tokenizer, 128, MAX_TOKENS)

    def __call__(self, folder: Path) -> dict[str, float]:
        """Held-out loss (all blocks, and the confirm part: blocks 3, 7, 11, …) and out-of-domain loss. Every block
        is full, so transformers' `labels=` loss of a batch is the mean of its blocks' losses."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

        def loss(blocks: torch.Tensor) -> float:
            batches = blocks.split(16)
            return sum(model(input_ids=b, labels=b).loss.item() * len(b) for b in batches) / len(blocks)

        with torch.no_grad():
            held = self.blocks["validation"]
            confirm = held[3::4]
            search = held[[i for i in range(len(held)) if i % 4 != 3]]
            c, s = loss(confirm), loss(search)
            return {"validation": (c * len(confirm) + s * len(search)) / len(held), "confirm": c,
                    "ood": loss(self.blocks["ood"])}


def rev(step: int) -> str:
    return f"step{step}"


def window(end: int, n: int, interval: int) -> list[str]:
    return [rev(s) for s in range(end - (n - 1) * interval, end + 1, interval)]


def fixed(root: Path, merges: Path, name: str, revisions: list[str], **how) -> tuple[Path, list[float]]:
    """A fixed merge through hf-bomerge's API, saved as a transformers checkpoint."""
    result = hf_bomerge.merge(str(root / "constant"), ",".join(revisions), max_checkpoints=0, evaluate=False,
                              cache_dir=merges.parent / "cache", progress=False, **how)
    return result.save_pretrained(merges / name, overwrite=True, progress=False), result.weights


def phase_of(root: Path, revisions: list[str]) -> dict:
    ckpts = CheckpointSet([root / "constant" / r for r in revisions], revisions)
    found = phase.measure(ckpts)
    return {"max_cosine": max(found.cosines), "cosines": [round(c, 3) for c in found.cosines],
            "changes": [round(c, 4) for c in found.changes], "early": found.early}


def one_seed(args, seed: int) -> dict:
    p = reproduce_train.params(args.steps, args.interval, args.decay_steps, seed)
    t0 = time.perf_counter()
    root = reproduce_train.build(OUT / "reproduce", p, log)
    train_s = time.perf_counter() - t0
    merges = root / "merges"
    meter = Meter(root, root / "constant" / rev(args.steps))
    S, V, N, branch = args.steps, args.interval, args.window, args.steps - args.decay_steps
    last8, decay_span = window(S, N, V), window(S, (S - branch) // V + 1, V)
    rows: dict[str, dict] = {}

    def add(label: str, folder: Path, weights_over: str, weights=None) -> None:
        rows[label] = {**meter(folder), "over": weights_over,
                       "weights": [round(w, 4) for w in weights] if weights else None}
        log(f"{label}: {rows[label]['validation']:.4f} held-out, {rows[label]['ood']:.4f} ood")

    add("annealed fork (LR→0 over the decay span)", root / "annealed" / rev(S), rev(S))
    add("constant LR, last checkpoint", root / "constant" / rev(S), rev(S))
    singles = {r: meter(root / "constant" / r) for r in last8}
    best = min(singles, key=lambda r: singles[r]["validation"] * 4 / 3 - singles[r]["confirm"] / 3)  # search part
    rows["constant LR, best single of the window (on the search part)"] = {**singles[best], "over": best,
                                                                            "weights": None}
    span = f"{last8[0]}..{last8[-1]} ({N})"
    for method in ("sma", "ema", "wma"):
        folder, w = fixed(root, merges, method, last8, method=method)
        add(f"{method.upper()}" + (" (α=0.2)" if method == "ema" else ""), folder, span, w)
    # WSM through hf-bomerge's own rule (--method wsm-*, --window in steps), over the same 8 checkpoints: a window
    # of the fork's decay span gives the checkpoints before it no weight.
    folder, w = fixed(root, merges, "wsm-linear-decay-span", last8, method="wsm-linear", window=args.decay_steps)
    assert all(abs(a - b) < 1e-12 for a, b in zip(w, [0.0] * (N - len(decay_span)) + trapezoid(len(decay_span))))
    add("WSM-linear, window = the fork's decay span", folder, f"{decay_span[0]}..{decay_span[-1]} "
        f"({len(decay_span)})", w)
    for shape in ("linear", "cosine"):
        folder, w = fixed(root, merges, f"wsm-{shape}", last8, method=f"wsm-{shape}", window=(N - 1) * V)
        add(f"WSM-{shape}", folder, span, w)
    long = window(S, 2 * N, V)
    folder, w = fixed(root, merges, "wsm-linear-long", long, method="wsm-linear", window=(2 * N - 1) * V)
    assert all(abs(a - b) < 1e-12 for a, b in zip(w, trapezoid(2 * N)))
    add("WSM-linear, 2× window", folder, f"{long[0]}..{long[-1]} ({2 * N})", w)

    t1 = time.perf_counter()
    result = hf_bomerge.search(str(root / "constant"), ",".join(last8), max_checkpoints=0,
                               dataset=str(root / "heldout" / "validation.jsonl"),
                               eval_datasets=[str(root / "heldout" / "ood.jsonl")], trials=args.trials,
                               max_eval_tokens=MAX_TOKENS, eval_dtype="float32", device="cpu", seed=seed,
                               cache_dir=merges.parent / "cache", progress=False)
    search_s = time.perf_counter() - t1
    folder = result.save_pretrained(merges / "gp", overwrite=True, progress=False)
    add(f"GP merge (hf_bomerge.search, {args.trials} trials)", folder, span, result.weights)
    gp = {"confirm_reported": result.confirm, "loss_reported": result.loss, "seconds": round(search_s, 1),
          "generalization": result.generalization}

    scan = []
    for n in (4, N):
        for end in args.scan_ends:
            if end - (n - 1) * V < V:
                continue
            revs = window(end, n, V)
            folder, _ = fixed(root, merges, f"scan-sma{n}-{end}", revs, method="sma")
            latest, merged = meter(root / "constant" / rev(end)), meter(folder)
            scan.append({"n": n, "window": f"{revs[0]}..{revs[-1]}", "latest": latest["validation"],
                         "sma": merged["validation"], "latest_ood": latest["ood"], "sma_ood": merged["ood"],
                         **phase_of(root, revs)})
            log(f"scan N={n} ending {end}: latest {latest['validation']:.4f}, SMA {merged['validation']:.4f}, "
                f"max cos(Δᵢ, Δᵢ₊₁) {scan[-1]['max_cosine']:.3f}")
    return {"seed": seed, "root": str(root), "rows": rows, "gp": gp, "scan": scan, "best_single": best,
            "train_seconds": round(train_s, 1), "meta": json.loads((root / "trajectory.json").read_text())}


def machine() -> str:
    import transformers

    return (f"{cpu_model()}, {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f} at the end), Python "
            f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")


def report(runs: list[dict], args, seconds: float) -> str:
    lines = [f"`python benchmarks/reproduce.py --seeds {','.join(str(r['seed']) for r in runs)}` — {machine()}; "
             f"{seconds / 60:.1f} min wall.", ""]
    for run in runs:
        meta = run["meta"]
        lines += [f"**Seed {run['seed']}** ({meta['num_parameters']:,} parameters, {meta['tokens_per_step']} tokens "
                  f"per step, {args.steps} steps, checkpoint every {args.interval}; fork from step "
                  f"{meta['branch_step']}; training {meta['train_seconds']} s when built). Loss in nats/token; "
                  "lower is better. Δ = vs the annealed fork.", "",
                  "| model | checkpoints merged | held-out (all 256 blocks) | held-out confirm part (64) | Δ confirm "
                  "| out-of-domain | Δ ood |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        ref = next(iter(run["rows"].values()))
        for label, row in run["rows"].items():
            lines.append(f"| {label} | {row['over']} | {row['validation']:.4f} | {row['confirm']:.4f} | "
                         f"{row['confirm'] - ref['confirm']:+.4f} | {row['ood']:.4f} | {row['ood'] - ref['ood']:+.4f} |")
        c = run["gp"]["confirm_reported"] or {}
        lines += ["", f"GP merge as hf-bomerge reports it: search-part loss {run['gp']['loss_reported']:.4f}, "
                  f"confirm {c.get('loss', float('nan')):.4f}, best baseline there `{c.get('best_baseline')}`, "
                  f"bootstrap 95% interval of (merge − best baseline) "
                  f"[{', '.join(f'{x:+.4f}' for x in c.get('interval') or [])}]; search {run['gp']['seconds']} s. "
                  f"Weights: GP {run['rows'][next(k for k in run['rows'] if k.startswith('GP'))]['weights']}.", "",
                  "PMA's early-training effect: SMA of the window vs the window's latest checkpoint (held-out, all "
                  "blocks); gain = latest − SMA (positive: the merge helps); max cos = the largest cosine between "
                  "consecutive updates in the window, hf_bomerge.reading.phase's statistic (it warns above "
                  f"{phase.ALIGNED}); relative change = ‖θᵢ₊₁ − θᵢ‖/‖θᵢ₊₁‖ of the window's first and last pair.", "",
                  "| N | window | latest | SMA | gain | gain ood | max cos | relative change first → last | warns |",
                  "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
        for s in run["scan"]:
            lines.append(f"| {s['n']} | {s['window']} | {s['latest']:.4f} | {s['sma']:.4f} | "
                         f"{s['latest'] - s['sma']:+.4f} | {s['latest_ood'] - s['sma_ood']:+.4f} | {s['max_cosine']:.3f} | "
                         f"{s['changes'][0]:.3f} → {s['changes'][-1]:.3f} | {'yes' if s['early'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1", help="training seeds, comma-separated (default 0,1)")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--interval", type=int, default=50)
    parser.add_argument("--decay-steps", type=int, default=200, help="the annealed fork's decay (default 200)")
    parser.add_argument("--window", type=int, default=8, help="checkpoints merged (default 8)")
    parser.add_argument("--trials", type=int, default=24, help="the GP's budget, seeds included (default 24)")
    parser.add_argument("--scan-ends", default="200,250,300,400,600,800,1000,1200")
    args = parser.parse_args()
    args.scan_ends = [int(x) for x in args.scan_ends.split(",")]
    torch.set_num_threads(1)  # 2 threads on a loaded 2-core box ran a training step ~10× slower (measured)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("hf_bomerge").setLevel(logging.ERROR)  # the early-phase warning would flood the scan
    start = time.perf_counter()
    runs = [one_seed(args, int(s)) for s in args.seeds.split(",")]
    text = report(runs, args, time.perf_counter() - start)
    OUT.mkdir(exist_ok=True)
    (OUT / "reproduce.md").write_text(text + "\n")
    (OUT / "reproduce.json").write_text(json.dumps(runs, indent=1, default=str) + "\n")
    print(text)


if __name__ == "__main__":
    main()
