"""Search: hf-bomerge's GP vs TPE vs random vs a dense grid, on a real checkpoint trajectory (benchmarks/README.md).

    python benchmarks/search_bench.py            # the full run (12–24 min on 2 shared CPU cores)
    python benchmarks/search_bench.py --quick    # a smoke run (a few minutes)
    python benchmarks/search_bench.py --variants # after a full run: GP parameterization/seeding variants
    python benchmarks/search_bench.py --schedule # schedule vs simplex vs family on 16 checkpoints (schedule_bench.py)

What it does:
1. Trains its own trajectory (cached under benchmarks/out/, gitignored): the demo's tiny Pythia-like
   GPT-NeoX on CPython's stdlib source at a constant learning rate, with a checkpoint every 25 steps from
   step 200 to step 800 (25 checkpoints, fp16 like Pythia's). Held-out = the demo's held-out stdlib
   packages (never trained on); out-of-domain (ood) = the demo's English prose (pydoc topics).
2. Every method calls the same `evaluate(weights) -> held-out loss`: hf-bomerge's own evaluator
   (`evaluator.Evaluator`: a resident model whose params get Σ wᵢθᵢ, mean token NLL on packed blocks). No
   cache: a method pays for every evaluation it asks for.
3. Settings (the last k checkpoints): pairwise (k=2, λ ∈ [0,1]), simplex N=4, simplex N=8, family N=24.
   Samplers at equal trial budgets, over several seeds: the GP is exactly `study.run_search` (baselines
   enqueued first, `GPSampler(seed, n_startup_trials=#seeds, deterministic_objective=True)`); TPE and
   random run through the very same `run_search` (same space, same enqueued baselines) with
   `sampler=` a factory of `TPESampler(seed=seed)` / `RandomSampler(seed=seed)`.
4. References ("the best loss"): a dense grid (pairwise: 101 λ; simplex N=4: 9³ stick-breaking
   coordinates, step 0.125; family: every window 1..24 × 21 decays), for N=8: 200 random draws; each then
   polished by Nelder–Mead from its best point, and finally the minimum with everything any sampler found.
5. Prints a markdown table and writes it to benchmarks/out/search_bench.md (--quick: search_bench-quick.md),
   every trial's loss to search_bench.json.
--variants reruns the simplex settings with the GP (and TPE/random) on other parameterizations (the former
stick-breaking, softmax logits, normalized x/Σx, the shipped log-scale ratio coordinates) and seedings (only
latest/uniform/EMA instead of every single checkpoint), against the references of the last full run:
benchmarks/out/search_bench-variants.md. Pick the runs with --combos sampler/space/seeds,... and --n N, e.g.

    python benchmarks/search_bench.py --variants --combos gp/norm/all,tpe/norm/all,random/norm/all --n 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import optuna
import torch
from cpu import cpu_model

from hf_bomerge import demo
from hf_bomerge.merging import weights as W
from hf_bomerge.objectives.evaluator import Evaluator as _Evaluator
from hf_bomerge.objectives.heldout import HeldOutSpec
from hf_bomerge.prepare import Prepared as _Prepared
from hf_bomerge.prepare import quiet_libraries as _quiet_libraries
from hf_bomerge.reading.checkpoints import CheckpointSet
from hf_bomerge.searching.study import make_space, run_search

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
STEPS = list(range(200, 801, 25))  # 25 checkpoints; the settings use the last 2, 4, 8 and 24
SETTINGS = [  # (name, search space, number of last checkpoints, trial budget)
    ("pairwise", "pairwise", 2, 12),
    ("simplex N=4", "simplex", 4, 20),
    ("simplex N=8", "simplex", 8, 30),
    ("family N=24", "family", 24, 20),
]
SAMPLERS = ("gp", "tpe", "random")
WITHIN = 0.002  # "within 0.2% of the reference best loss"


def log(msg: str) -> None:
    print(f"[search_bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the trajectory
def build_trajectory() -> Path:
    """The demo's build with more checkpoints (the demo's PARAMS with other `steps`), cached by its hash."""
    saved = demo.PARAMS
    demo.PARAMS = {**saved, "steps": STEPS}
    try:
        root = OUT / f"search-trajectory-{demo._build_id(torch.__version__, __import__('transformers').__version__)}"
        if not (root / "trajectory.json").is_file():
            log(f"training the trajectory into {root} (steps {STEPS[0]}..{STEPS[-1]} every 25) ...")
        return demo.build_trajectory(root)
    finally:
        demo.PARAMS = saved


class Objective:
    """The evaluator over the last `n_max` checkpoints; a setting over the last k pads its weights with zeros
    (zero weights are skipped by the merge, so this is the same arithmetic as a k-checkpoint merge)."""

    def __init__(self, root: Path, n_max: int, max_eval_tokens: int, batch_size: int):
        meta = json.loads((root / "trajectory.json").read_text())
        self.names = meta["revisions"][-n_max:]
        folders = [root / name for name in self.names]
        ckpts = CheckpointSet(folders, self.names)
        known = {"source": None, "names": self.names, "shas": [""] * n_max, "folders": folders,
                 "tokenizer_folder": folders[-1], "note": None, "ckpts": ckpts}
        prep = _Prepared(**{f.name: known.get(f.name) for f in dataclasses.fields(_Prepared)})
        cache = OUT / "search_bench" / "cache"
        self.ev = _Evaluator(prep, dataset=HeldOutSpec.parse(str(root / "heldout" / "validation.jsonl")),
                             block_size=None, max_eval_tokens=max_eval_tokens, batch_size=batch_size,
                             eval_dtype="float32", device="cpu", trust_remote_code=False, cache_dir=cache)
        self.ood_spec = HeldOutSpec.parse(str(root / "heldout" / "ood.jsonl"))
        self.calls = 0
        self.seconds = 0.0

    def padded(self, weights) -> list[float]:
        return [0.0] * (len(self.names) - len(weights)) + list(weights)

    def heldout(self, weights) -> float:
        start = time.perf_counter()
        loss = self.ev(self.padded(weights))
        self.calls += 1
        self.seconds += time.perf_counter() - start
        return loss

    def ood(self, weights) -> float:
        return self.ev(self.padded(weights), self.ood_spec)


# ---------------------------------------------------------------- the samplers
def sampler_for(kind: str):
    """The `sampler=` given to `study.run_search`: None for the shipped GP, else a factory (seed, n_seeds)."""
    if kind == "gp":
        return None
    if kind == "gpnoise":  # the shipped GP, but fitting a noise variance (deterministic_objective=False)
        return lambda seed, n_seeds: optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_seeds,
                                                               deterministic_objective=False)
    if kind == "tpe":
        return lambda seed, n_seeds: optuna.samplers.TPESampler(seed=seed)
    return lambda seed, n_seeds: optuna.samplers.RandomSampler(seed=seed)


@dataclass
class Run:
    setting: str
    sampler: str
    seed: int
    losses: list[float]          # in trial order, seeds (baselines) first
    weights: list[float]         # of the best trial
    seconds: float
    ood: float | None = None

    @property
    def best(self) -> float:
        return min(self.losses)

    def trials_to(self, target: float) -> int:
        """1-based number of trials until the best-so-far is ≤ target; budget+1 if never."""
        best = math.inf
        for i, loss in enumerate(self.losses, 1):
            best = min(best, loss)
            if best <= target:
                return i
        return len(self.losses) + 1


def search_run(obj: Objective, setting: str, kind: str, k: int, budget: int, sampler: str, seed: int,
               tmp: Path) -> Run:
    space = make_space(kind, k)
    labels = obj.names[-k:]
    db = tmp / f"{setting.replace(' ', '_').replace('=', '')}-{sampler}-{seed}.db"
    start = time.perf_counter()
    outcome = run_search(obj.heldout, space, labels, trials=budget, storage=f"sqlite:///{db}",
                         study_name="bench", inputs={"bench": setting, "sampler": sampler, "seed": seed},
                         seed=seed, progress=False, sampler=sampler_for(sampler))
    seconds = time.perf_counter() - start
    db.unlink(missing_ok=True)
    trials = sorted(outcome.trials, key=lambda t: t.number)
    return Run(setting, sampler, seed, [t.loss for t in trials], outcome.best.weights, seconds)


# ---------------------------------------------------------------- references
def polish(f, x0: list[float], bounds: list[tuple[float, float]], maxfev: int) -> tuple[float, list[float]]:
    """Nelder–Mead from x0 within the box (a local refinement of the best point found)."""
    from scipy.optimize import minimize

    res = minimize(f, x0, method="Nelder-Mead", bounds=bounds,
                   options={"maxfev": maxfev, "xatol": 1e-4, "fatol": 1e-6, "initial_simplex": None})
    return float(res.fun), list(map(float, res.x))


def reference(obj: Objective, kind: str, k: int, quick: bool) -> dict:
    """The best loss a large budget finds: a grid (or random draws) then a Nelder–Mead polish."""
    start, calls = time.perf_counter(), obj.calls
    pts: list[tuple[float, list[float]]] = []
    if kind == "pairwise":
        n = 21 if quick else 101
        for i in range(n):
            lam = i / (n - 1)
            pts.append((obj.heldout(W.pairwise(lam)), [lam]))
        how = f"grid of {n} λ"
        to_w = lambda x: W.pairwise(min(1.0, max(0.0, x[0])))
        bounds = [(0.0, 1.0)]
    elif kind == "simplex" and k == 4:
        n = 5 if quick else 9
        for a in range(n):
            for b in range(n):
                for c in range(n):
                    z = [a / (n - 1), b / (n - 1), c / (n - 1)]
                    pts.append((obj.heldout(W.from_simplex_coords(z)), z))
        how = f"grid of {n}³ stick-breaking coordinates"
        to_w = lambda x: W.from_simplex_coords([min(1.0, max(0.0, v)) for v in x])
        bounds = [(0.0, 1.0)] * 3
    elif kind == "simplex":
        n = 30 if quick else 200
        rng = random.Random(12345)
        for _ in range(n):
            z = [rng.random() for _ in range(k - 1)]
            pts.append((obj.heldout(W.from_simplex_coords(z)), z))
        how = f"{n} random (Dirichlet(1)) weight vectors"
        to_w = lambda x: W.from_simplex_coords([min(1.0, max(0.0, v)) for v in x])
        bounds = [(0.0, 1.0)] * (k - 1)
    else:  # family: window × decay
        decays = [i / 10 for i in range(11)] if quick else [i / 20 for i in range(21)]
        windows = range(1, k + 1, 4 if quick else 1)
        for window in windows:
            for decay in decays:
                pts.append((obj.heldout(W.window_decay(k, window, decay)), [window, decay]))
        how = f"grid of windows {'1..' + str(k)} × {len(decays)} decays"
        best_window = int(min(pts)[1][0])
        to_w = lambda x: W.window_decay(k, best_window, min(1.0, max(0.0, x[0])))
        bounds = [(0.0, 1.0)]
    loss, x = min(pts, key=lambda p: p[0])
    if kind == "family":
        x = [x[1]]
    fev = 20 if quick else (40 if kind in ("pairwise", "family") else 150)
    p_loss, p_x = polish(lambda v: obj.heldout(to_w(list(v))), x, bounds, fev)
    if p_loss < loss:
        loss = p_loss
    return {"loss": loss, "how": f"{how} + Nelder–Mead polish ({fev} evals)", "grid_loss": min(p[0] for p in pts),
            "evals": obj.calls - calls, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------- report
def fmt(x: float) -> str:
    return f"{x:.4f}"


def machine() -> str:
    return f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, optuna {optuna.__version__}"


def baselines(obj: Objective, k: int) -> dict:
    """Single checkpoints, uniform and EMA of the last k, on held-out and ood (reporting only, not a search)."""
    singles = {name: obj.heldout(W.one_hot(k, i)) for i, name in enumerate(obj.names[-k:])}
    best_single = min(singles, key=singles.get)
    singles_ood = {name: obj.ood(W.one_hot(k, i)) for i, name in enumerate(obj.names[-k:])}
    return {"best_single": best_single, "best_single_loss": singles[best_single],
            "best_single_ood": singles_ood[best_single],
            "min_single_ood": min(singles_ood.values()), "min_single_ood_name": min(singles_ood, key=singles_ood.get),
            "uniform": obj.heldout(W.uniform(k)), "uniform_ood": obj.ood(W.uniform(k)),
            "ema": obj.heldout(W.ema(k)), "ema_ood": obj.ood(W.ema(k))}


def report(runs: list[Run], refs: dict, bases: dict, args, seconds: float, obj: Objective) -> str:
    lines = [f"Trajectory: tiny GPT-NeoX ({', '.join(f'{k}={v}' for k, v in bases['_model'].items())}), "
             f"constant LR, checkpoints every 25 steps ({STEPS[0]}..{STEPS[-1]}), fp16; held-out = stdlib "
             f"packages never trained on; ood = English prose (pydoc topics); {args.max_eval_tokens} tokens "
             f"each. {args.seeds} seeds per (setting, sampler); loss = mean token NLL (nats).", "",
             "| setting | sampler | budget | final best loss: median (min–max) | trials to ≤ ref+0.2%: "
             "median (reached) | s/run |", "| --- | --- | --- | --- | --- | --- |"]
    for name, _kind, _k, budget in SETTINGS:
        ref = refs[name]["loss"]
        for sampler in SAMPLERS:
            rs = [r for r in runs if r.setting == name and r.sampler == sampler]
            bests = [r.best for r in rs]
            hits = [r.trials_to(ref * (1 + WITHIN)) for r in rs]
            reached = sum(h <= budget for h in hits)
            med = statistics.median(hits)
            med_s = f"{med:g}" if med <= budget else f"not reached ({med:g})"
            lines.append(f"| {name} | {sampler} | {budget} | {fmt(statistics.median(bests))} "
                         f"({fmt(min(bests))}–{fmt(max(bests))}) | {med_s} ({reached}/{len(rs)}) | "
                         f"{statistics.mean(r.seconds for r in rs):.1f} |")
        r = refs[name]
        lines.append(f"| {name} | **reference** | {r['evals']} evals | **{fmt(ref)}** | {r['how']}, min with every "
                     f"sampler run | {r['seconds']:.0f} |")
    lines += ["", "“not reached” counts as budget+1 in the median. Trials count the enqueued baselines "
              "(pairwise: λ=1, λ=0, uniform, EMA; simplex: each single checkpoint, uniform, EMA; family: the "
              "latest and uniform; EMA is not in the family space, so it is no trial there).", "",
              "GP (run_search) merge vs baselines, held-out and out-of-domain (ood); merged = median over seeds "
              "(min–max); best single = the single checkpoint of the setting with the lowest held-out loss:", "",
              "| setting | merged held-out | best single held-out | uniform | EMA | merged ood | best single ood "
              "| lowest single ood | uniform ood | EMA ood |", "|" + " --- |" * 10]
    for name, _kind, _k, _budget in SETTINGS:
        b = bases[name]
        gp = [r for r in runs if r.setting == name and r.sampler == "gp"]
        h, o = [r.best for r in gp], [r.ood for r in gp]
        lines.append(f"| {name} | {fmt(statistics.median(h))} ({fmt(min(h))}–{fmt(max(h))}) | "
                     f"{fmt(b['best_single_loss'])} ({b['best_single']}) | {fmt(b['uniform'])} | {fmt(b['ema'])} | "
                     f"{fmt(statistics.median(o))} ({fmt(min(o))}–{fmt(max(o))}) | {fmt(b['best_single_ood'])} | "
                     f"{fmt(b['min_single_ood'])} ({b['min_single_ood_name']}) | {fmt(b['uniform_ood'])} | "
                     f"{fmt(b['ema_ood'])} |")
    lines += ["", "Targets:", ""]
    for verdict in targets(runs, refs, bases):
        lines.append(f"- {verdict}")
    lines += ["", f"Machine: {machine()}. Command: `python benchmarks/search_bench.py"
              f"{' --quick' if args.quick else ''}` (seeds {args.seeds}, max_eval_tokens {args.max_eval_tokens}). "
              f"Wall time {seconds / 60:.1f} min ({obj.calls} evaluations, {obj.seconds / max(obj.calls, 1):.2f} s "
              f"each on average)."]
    return "\n".join(lines) + "\n"


def targets(runs: list[Run], refs: dict, bases: dict) -> list[str]:
    out = []
    ref = refs["pairwise"]["loss"]
    gp = [r for r in runs if r.setting == "pairwise" and r.sampler == "gp"]
    hits = [r.trials_to(ref * (1 + WITHIN)) for r in gp]
    ok = all(h <= 12 for h in hits)
    out.append(f"{'PASS' if ok else 'MISS'}: pairwise, GP within 0.2% of the grid's best ({fmt(ref)}) in ≤ 12 "
               f"trials on every seed: trials needed {hits} (budget+1 = not reached); final gap "
               f"{', '.join(f'{100 * (r.best / ref - 1):+.3f}%' for r in gp)}.")
    for name in ("simplex N=4", "simplex N=8"):
        med = {s: statistics.median(r.best for r in runs if r.setting == name and r.sampler == s) for s in SAMPLERS}
        ok = med["gp"] < med["tpe"] and med["gp"] < med["random"]
        out.append(f"{'PASS' if ok else 'MISS'}: {name}, GP's median final loss beats TPE's and random's at equal "
                   f"budget: GP {fmt(med['gp'])}, TPE {fmt(med['tpe'])}, random {fmt(med['random'])}.")
    for name, _, _, _ in SETTINGS:
        b = bases[name]
        gp = [r for r in runs if r.setting == name and r.sampler == "gp"]
        h = statistics.median(r.best for r in gp)
        o = statistics.median(r.ood for r in gp)
        n_h = sum(r.best < b["best_single_loss"] for r in gp)
        n_o = sum(r.ood < b["best_single_ood"] for r in gp)
        ok = n_h == len(gp) and n_o == len(gp)
        out.append(f"{'PASS' if ok else 'MISS'}: {name}, GP merge below the best single checkpoint "
                   f"({b['best_single']}) on held-out ({fmt(h)} vs {fmt(b['best_single_loss'])}, "
                   f"{100 * (h / b['best_single_loss'] - 1):+.2f}%, {n_h}/{len(gp)} seeds) and on ood "
                   f"({fmt(o)} vs {fmt(b['best_single_ood'])}, {100 * (o / b['best_single_ood'] - 1):+.2f}%, "
                   f"{n_o}/{len(gp)} seeds; the lowest single on ood is {fmt(b['min_single_ood'])}).")
    return out


# ---------------------------------------------------------------- --variants: why the GP wins or loses
class VariantSpace:
    """A simplex space for the investigation: `run_search` only needs suggest/params_for/weights/seeds.

    param: "stick" (stick-breaking coordinates, N−1 in [0, 1]), "softmax" (N logits in [-LOGIT, LOGIT])
    "norm" (N coordinates x in [0, 1], w = x/Σx; a baseline is x = w/max(w), exactly: a single
    checkpoint is a one-hot corner, uniform the all-ones corner) or "lognorm" (the same with each
    coordinate on a log scale: v in [ε, 1], log=True, w ∝ v − ε, ε = e⁻⁶ as softmax's ±3 logits; the
    baselines are exact too);
    seeds: "all" (the shipped baselines: every single checkpoint, uniform, EMA) or "few" (the latest,
    uniform, EMA).
    """

    LOGIT = 3.0
    EPS = math.exp(-6.0)

    def __init__(self, n: int, param: str, seeds: str):
        self.n, self.param, self.seed_kind, self.kind = n, param, seeds, "simplex"
        self.shipped = make_space("simplex", n)  # for the seeds only

    def suggest(self, trial):
        if self.param == "stick":
            return self.weights({f"z{k}": trial.suggest_float(f"z{k}", 0.0, 1.0) for k in range(self.n - 1)})
        if self.param == "norm":
            return self.weights({f"x{i}": trial.suggest_float(f"x{i}", 0.0, 1.0) for i in range(self.n)})
        if self.param == "lognorm":
            return self.weights({f"x{i}": trial.suggest_float(f"x{i}", self.EPS, 1.0, log=True)
                                 for i in range(self.n)})
        return self.weights({f"x{i}": trial.suggest_float(f"x{i}", -self.LOGIT, self.LOGIT) for i in range(self.n)})

    def weights(self, params):
        if self.param == "stick":
            return W.from_simplex_coords([params[f"z{k}"] for k in range(self.n - 1)])
        if self.param == "norm":
            x = [params[f"x{i}"] for i in range(self.n)]
            return [v / sum(x) for v in x] if sum(x) > 0 else W.uniform(self.n)
        if self.param == "lognorm":
            x = [max(0.0, params[f"x{i}"] - self.EPS) for i in range(self.n)]
            return [v / sum(x) for v in x] if sum(x) > 0 else W.uniform(self.n)
        e = [math.exp(params[f"x{i}"]) for i in range(self.n)]
        return [v / sum(e) for v in e]

    def params_for(self, weights):
        if self.param == "stick":
            return {f"z{k}": z for k, z in enumerate(W.to_simplex_coords(weights))}
        if self.param == "norm":
            return {f"x{i}": w / max(weights) for i, w in enumerate(weights)}
        if self.param == "lognorm":
            return {f"x{i}": self.EPS + (1.0 - self.EPS) * w / max(weights) for i, w in enumerate(weights)}
        # the nearest point of the box: log-weights centred on their mean (uniform = the box's centre),
        # clipped (a single checkpoint becomes ~99% of the merge)
        logs = [math.log(max(w, 1e-12)) for w in weights]
        mean = sum(logs) / len(logs)
        return {f"x{i}": max(-self.LOGIT, min(self.LOGIT, v - mean)) for i, v in enumerate(logs)}

    def param_names(self):
        return [f"z{k}" for k in range(self.n - 1)] if self.param == "stick" else [f"x{i}" for i in range(self.n)]

    def seeds(self, labels, ema_alpha=0.2):
        seeds = self.shipped.seeds(labels, ema_alpha)
        if self.seed_kind == "few":
            seeds = [s for s in seeds if s[0] in (labels[-1], "uniform", "ema")]
        return seeds


def variant_run(obj: Objective, setting: str, k: int, budget: int, sampler: str, seed: int, param: str,
                seeds: str, tmp: Path) -> Run:
    space = VariantSpace(k, param, seeds)
    db = tmp / f"variant-{k}-{param}-{seeds}-{sampler}-{seed}.db"
    start = time.perf_counter()
    outcome = run_search(obj.heldout, space, obj.names[-k:], trials=budget, storage=f"sqlite:///{db}",
                         study_name="bench", inputs={}, seed=seed, progress=False, sampler=sampler_for(sampler))
    db.unlink(missing_ok=True)
    trials = sorted(outcome.trials, key=lambda t: t.number)
    return Run(setting, f"{sampler}/{param}/{seeds} seeds", seed, [t.loss for t in trials], outcome.best.weights,
               time.perf_counter() - start)


DEFAULT_COMBOS = "gp/stick/few,gp/softmax/all,gp/softmax/few,tpe/stick/few,tpe/softmax/few,random/stick/few"


def variants(obj: Objective, args, refs: dict, tmp: Path) -> str:
    combos = [tuple(c.split("/")) for c in args.combos.split(",")]
    lines = ["", "Investigation (--variants): the simplex settings with other parameterizations/seeds, same "
             "budgets and seeds; reference as above.", "",
             "| setting | sampler / parameterization / seeds | final best loss: median (min–max) | trials to ≤ "
             "ref+0.2%: median (reached) |", "| --- | --- | --- | --- |"]
    verdicts = []
    for name, kind, k, budget in SETTINGS:
        if kind != "simplex" or (args.n and k not in args.n):
            continue
        ref = refs[name]["loss"]
        medians = {}
        for sampler, param, seeds in combos:
            rs = [variant_run(obj, name, k, budget, sampler, seed, param, seeds, tmp) for seed in range(args.seeds)]
            bests = [r.best for r in rs]
            medians[sampler, param, seeds] = statistics.median(bests)
            hits = [r.trials_to(ref * (1 + WITHIN)) for r in rs]
            log(f"{name} {rs[0].sampler}: {[round(b, 4) for b in bests]}")
            lines.append(f"| {name} | {rs[0].sampler} | {fmt(statistics.median(bests))} ({fmt(min(bests))}–"
                         f"{fmt(max(bests))}) | {statistics.median(hits):g} ({sum(h <= budget for h in hits)}/"
                         f"{len(rs)}) |")
        for (sampler, param, seeds), med in medians.items():  # the target, where all three samplers ran
            tpe, rnd = medians.get(("tpe", param, seeds)), medians.get(("random", param, seeds))
            if sampler == "gp" and tpe is not None and rnd is not None:
                verdicts.append(f"- {'PASS' if med < tpe and med < rnd else 'MISS'}: {name}, {param}/{seeds} "
                                f"seeds: GP {fmt(med)}, TPE {fmt(tpe)}, random {fmt(rnd)}.")
    if verdicts:
        lines += ["", "GP's median final loss vs TPE's and random's on the same parameterization and seeds:", "",
                  *verdicts]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, small grids, fewer tokens")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per (setting, sampler) (default 5; quick 2)")
    parser.add_argument("--max-eval-tokens", type=int, default=None, help="held-out tokens (default 8192; quick 2048)")
    parser.add_argument("--batch-size", type=int, default=64, help="eval batch (any value gives the same loss)")
    parser.add_argument("--variants", action="store_true",
                        help="after a run: the simplex settings with other parameterizations/seeds "
                             "(reads that run's references, writes search_bench-variants.md)")
    parser.add_argument("--combos", default=DEFAULT_COMBOS,
                        help="--variants: comma-separated sampler/param/seeds, sampler gp|gpnoise|tpe|random, param "
                             "stick|softmax|norm|lognorm, seeds all|few (default: %(default)s)")
    parser.add_argument("--n", type=int, action="append",
                        help="--variants: only the simplex setting with this N (repeatable; default all)")
    parser.add_argument("--schedule", action="store_true",
                        help="schedule vs simplex vs family (GP, TPE, random) on a 16-checkpoint window, budgets "
                             "12/20/40, search/confirm/ood loss (benchmarks/schedule_bench.py; default 4 seeds)")
    parser.add_argument("--schedule-combos", metavar="SPACE/SAMPLER,...",
                        help="--schedule: only these (must include simplex/gp), e.g. simplex/gp,schedule-2d/gp")
    parser.add_argument("--schedule-revisions", metavar="R1,R2,...",
                        help="--schedule: this window instead of the last 16 (e.g. unevenly spaced checkpoints)")
    args = parser.parse_args()
    if args.schedule and not args.seeds:
        args.seeds = 2 if args.quick else 4
    args.seeds = args.seeds or (2 if args.quick else 5)
    args.max_eval_tokens = args.max_eval_tokens or (2048 if args.quick else 8192)
    start = time.perf_counter()
    warnings.filterwarnings("ignore")
    _quiet_libraries()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    torch.manual_seed(0)

    if args.schedule:
        sys.path.insert(0, str(HERE))
        import schedule_bench

        return schedule_bench.main(args, build_trajectory, sampler_for, machine, OUT, log)
    root = build_trajectory()
    n_max = max(k for _, _, k, _ in SETTINGS)
    obj = Objective(root, n_max, args.max_eval_tokens, args.batch_size)
    cfg = obj.ev.model.config
    bases: dict = {"_model": {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "vocab": cfg.vocab_size,
                              "params": sum(p.numel() for p in obj.ev.model.parameters())}}
    log(f"trajectory {root.name}: {len(obj.names)} checkpoints used ({obj.names[0]}..{obj.names[-1]}); "
        f"{obj.ev.blocks.numel()} held-out and {obj.ev.blocks_for(obj.ood_spec).numel()} ood tokens")

    tmp = Path(tempfile.mkdtemp(prefix="studies-", dir=OUT))
    if args.variants:
        previous = OUT / ("search_bench-quick.json" if args.quick else "search_bench.json")
        if not previous.is_file():
            sys.exit(f"--variants needs the references of a run: run without --variants first ({previous}).")
        saved = json.loads(previous.read_text())
        if saved["max_eval_tokens"] != args.max_eval_tokens:
            sys.exit(f"{previous} was made with max_eval_tokens {saved['max_eval_tokens']}; pass the same.")
        try:
            text = variants(obj, args, saved["references"], tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        text += f"\nWall time {(time.perf_counter() - start) / 60:.1f} min.\n"
        print(text)
        out = OUT / ("search_bench-variants-quick.md" if args.quick else "search_bench-variants.md")
        out.write_text(text)
        log(f"wrote {out}")
        return
    runs: list[Run] = []
    refs: dict = {}
    try:
        for name, kind, k, budget in SETTINGS:
            bases[name] = baselines(obj, k)
            for sampler in SAMPLERS:
                for seed in range(args.seeds):
                    run = search_run(obj, name, kind, k, budget, sampler, seed, tmp)
                    if sampler == "gp":
                        run.ood = obj.ood(run.weights)
                    runs.append(run)
                    log(f"{name} {sampler} seed {seed}: best {run.best:.4f} after {len(run.losses)} trials "
                        f"({run.seconds:.1f} s)")
            refs[name] = reference(obj, kind, k, args.quick)
            found = min(r.best for r in runs if r.setting == name)
            refs[name]["loss"] = min(refs[name]["loss"], found)
            log(f"{name} reference {refs[name]['loss']:.4f} ({refs[name]['how']}; grid alone "
                f"{refs[name]['grid_loss']:.4f}; best of the samplers {found:.4f}; {refs[name]['seconds']:.0f} s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    text = report(runs, refs, bases, args, time.perf_counter() - start, obj)
    print(text)
    out = OUT / ("search_bench-quick.md" if args.quick else "search_bench.md")
    out.write_text(text)
    (out.with_suffix(".json")).write_text(json.dumps(
        {"runs": [dataclasses.asdict(r) for r in runs], "references": refs,
         "baselines": bases, "seeds": args.seeds, "max_eval_tokens": args.max_eval_tokens}, indent=1))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
