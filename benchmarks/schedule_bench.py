"""Search spaces on a 16-checkpoint window (issue 15, item 4): `schedule` vs `simplex` vs `family`, GP vs TPE vs
random, on the search part, the confirm part and out of domain, at budgets 12/20/40 (benchmarks/README.md).

    python benchmarks/search_bench.py --schedule            # the run in the README (~15–25 min on 2 shared cores)
    python benchmarks/search_bench.py --schedule --quick    # a smoke run (2 seeds, 2048 tokens)

What it does:
1. The trajectory of search_bench.py (tiny GPT-NeoX, constant LR, a checkpoint every 25 steps, 200..800); the
   last 16 checkpoints (step425..step800) are the window. Held-out = the demo's held-out stdlib packages, split
   as the shipped search splits it (every 4th block is the confirm part, never seen by any search); ood = the
   demo's English prose.
2. Each (space, sampler, seed) runs `study.run_search` once with 40 trials; samplers do not know the budget, so
   the first 12 and 20 trials of that run are exactly the 12- and 20-trial runs. At each budget the pick is the
   trial with the lowest search-part loss (what the shipped search exports); its confirm and ood losses are
   measured (cached by weights).
3. Target: the simplex GP's median confirm loss at 40 trials is C*; for every run, the trials until the pick's
   confirm loss is ≤ C*. `schedule` meets the target when its GP's median is ≤ 20 (half of 40).
4. Writes benchmarks/out/schedule_bench.md (--quick: schedule_bench-quick.md) and the raw runs as .json.

`--schedule-combos SPACE/SAMPLER,...` runs a subset (it must include simplex/gp, the target's reference), e.g.
the variants defined here: `schedule-2d` (window × shape, the LR decayed to 0 as in WSM) and `schedule-tail`
(the shipped space mixed with the uniform average, 4 dimensions):

    python benchmarks/search_bench.py --schedule --schedule-combos simplex/gp,schedule/gp,schedule-2d/gp
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

import optuna

from hf_bomerge.merging import weights as W
from hf_bomerge.objectives.evaluator import CONFIRM, Evaluator
from hf_bomerge.objectives.heldout import HeldOutSpec
from hf_bomerge.prepare import Prepared
from hf_bomerge.reading.checkpoints import CheckpointSet
from hf_bomerge.searching.study import run_search
from hf_bomerge.searching.weight_spaces import Schedule, register, space_for

K = 16
BUDGETS = (12, 20, 40)
COMBOS = [("simplex", "gp"), ("schedule", "gp"), ("family", "gp"), ("simplex", "tpe"), ("simplex", "random"),
          ("schedule", "tpe"), ("schedule", "random")]


@register
class ScheduleNoFloor(Schedule):
    """The shipped `schedule` space with the floor fixed at 0 (the LR decays to 0 at the end of the window, as
    WSM's schedules do): window × shape, 2 dimensions."""

    name = "schedule-2d"

    def suggest(self, trial):
        return self.weights({"window": trial.suggest_float("window", self.low, self.high, log=True),
                             "shape": trial.suggest_float("shape", -self.SHAPE, self.SHAPE)})

    def weights(self, params):
        return super().weights({**params, "floor": 0.0})

    def param_names(self):
        return ["window", "shape"]

    def raw_params(self, weights):
        params = super().raw_params(weights)
        return None if params is None or abs(params["floor"]) > 1e-9 else {k: params[k] for k in ("window", "shape")}


@register
class ScheduleTail(Schedule):
    """The shipped `schedule` space mixed with the uniform average over all N (`tail` τ ∈ [0, 0.5]): the simplex's
    best picks here keep small weights on the older checkpoints that a window cuts off. 4 dimensions."""

    name = "schedule-tail"

    def suggest(self, trial):
        return self.weights({"window": trial.suggest_float("window", self.low, self.high, log=True),
                             "shape": trial.suggest_float("shape", -self.SHAPE, self.SHAPE),
                             "floor": trial.suggest_float("floor", 0.0, 1.0),
                             "tail": trial.suggest_float("tail", 0.0, 0.5)})

    def weights(self, params):
        tail = params.get("tail", 0.0)
        return [(1 - tail) * w + tail / self.n for w in super().weights(params)]

    def param_names(self):
        return ["window", "shape", "floor", "tail"]

    def raw_params(self, weights):
        params = super().raw_params(weights)
        return None if params is None else {**params, "tail": 0.0}


class Objective:
    """The shipped evaluator over the window, with the shipped 3:1 search/confirm split; confirm and ood cached."""

    def __init__(self, root: Path, out: Path, max_eval_tokens: int, batch_size: int, names=None):
        meta = json.loads((root / "trajectory.json").read_text())
        self.names = list(names) if names else meta["revisions"][-K:]
        folders = [root / name for name in self.names]
        known = {"names": self.names, "shas": [""] * len(self.names), "folders": folders, "tokenizer_folder": folders[-1],
                 "ckpts": CheckpointSet(folders, self.names), "mode": "resident"}
        prep = Prepared(**{f.name: known.get(f.name) for f in dataclasses.fields(Prepared)})
        self.ev = Evaluator(prep, dataset=HeldOutSpec.parse(str(root / "heldout" / "validation.jsonl")),
                            block_size=None, max_eval_tokens=max_eval_tokens, batch_size=batch_size,
                            eval_dtype="float32", device="cpu", trust_remote_code=False, cache_dir=out / "cache",
                            confirm_fraction=0.25)
        self.ood_spec = HeldOutSpec.parse(str(root / "heldout" / "ood.jsonl"))
        self.calls, self.seconds, self._cache = 0, 0.0, {}

    def search(self, weights) -> float:
        start = time.perf_counter()
        loss = self.ev(list(weights))
        self.calls, self.seconds = self.calls + 1, self.seconds + time.perf_counter() - start
        return loss

    def confirm_and_ood(self, weights) -> tuple[float, float]:
        key = tuple(round(w, 12) for w in weights)
        if key not in self._cache:
            units = self.ev(list(weights), CONFIRM)  # per confirm document (or run): (NLL sum, tokens)
            confirmed = self.ev.objective.statistic(units, range(len(units)))
            self._cache[key] = (confirmed, self.ev(list(weights), self.ood_spec))
        return self._cache[key]


@dataclasses.dataclass
class Run:
    space: str
    sampler: str
    seed: int
    losses: list[float]        # search-part loss per trial, in trial order (the enqueued baselines first)
    confirm: list[float]       # the confirm loss of the pick after each trial
    ood: list[float]           # the ood loss of the pick after each trial
    seconds: float
    picks: dict                # budget -> weights of the pick

    def at(self, budget: int) -> tuple[float, float, float]:
        return min(self.losses[:budget]), self.confirm[budget - 1], self.ood[budget - 1]

    def trials_to(self, target: float) -> int:
        return next((i + 1 for i, c in enumerate(self.confirm) if c <= target), len(self.confirm) + 1)


def one_run(obj: Objective, kind: str, sampler: str, seed: int, sampler_for) -> Run:
    space = space_for(kind, obj.names)
    start = time.perf_counter()
    outcome = run_search(obj.search, space, obj.names, trials=max(BUDGETS), storage=optuna.storages.InMemoryStorage(),
                         study_name="bench", inputs={}, seed=seed, progress=False, sampler=sampler_for(sampler))
    seconds = time.perf_counter() - start
    trials = sorted(outcome.trials, key=lambda t: t.number)
    losses, confirm, ood, best = [], [], [], None
    for t in trials:
        losses.append(t.loss)
        if best is None or t.loss < best.loss:
            best = t
        c, o = obj.confirm_and_ood(best.weights)
        confirm.append(c)
        ood.append(o)
    picks = {b: min(trials[:b], key=lambda t: t.loss).weights for b in BUDGETS}
    return Run(kind, sampler, seed, losses, confirm, ood, seconds, picks)


def baselines(obj: Objective) -> dict:
    k = len(obj.names)
    singles = {n: obj.search(W.one_hot(k, i)) for i, n in enumerate(obj.names)}
    best = min(singles, key=singles.get)
    rules = {"latest": W.one_hot(k, k - 1), f"best single ({best})": W.one_hot(k, obj.names.index(best)),
             "uniform": W.uniform(k), "ema": W.ema(k), **{m: W.rule(m, k, names=obj.names)
                                                           for m in ("wsm-linear", "wsm-cosine", "wsm-sqrt")}}
    return {label: (obj.search(w), *obj.confirm_and_ood(w)) for label, w in rules.items()}


def _med(values) -> str:
    return f"{statistics.median(values):.4f} ({min(values):.4f}–{max(values):.4f})"


def report(runs: list[Run], bases: dict, args, seconds: float, obj: Objective, machine: str) -> str:
    simplex40 = [r.at(40)[1] for r in runs if (r.space, r.sampler) == ("simplex", "gp")]
    target = statistics.median(simplex40)
    blocks = len(obj.ev.objective.blocks), obj.ev.confirm_size
    lines = [f"Window: {len(obj.names)} checkpoints ({', '.join(obj.names)}) of the search "
             f"bench's trajectory; {args.max_eval_tokens} held-out tokens split {blocks[0]} search blocks / "
             f"{blocks[1]} confirm {obj.ev.objective.confirm_unit}; ood = English prose. {args.seeds} seeds per row; "
             "loss = mean token NLL "
             "(nats); median over seeds (min–max). The pick = the trial with the lowest search loss so far.", "",
             f"Target C* = the simplex GP's median confirm loss at 40 trials = {target:.4f}.", "",
             "| space | sampler | budget | search loss | confirm loss | ood loss | trials to confirm ≤ C*: median "
             "(reached) | s/run (40 trials) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for kind, sampler in combos(args):
        rs = [r for r in runs if (r.space, r.sampler) == (kind, sampler)]
        hits = [r.trials_to(target) for r in rs]
        reach = f"{statistics.median(hits):g} ({sum(h <= 40 for h in hits)}/{len(rs)})"
        for b in BUDGETS:
            s, c, o = zip(*(r.at(b) for r in rs))
            lines.append(f"| {kind} | {sampler} | {b} | {_med(s)} | {_med(c)} | {_med(o)} | "
                         f"{reach if b == 40 else ''} | {statistics.mean(r.seconds for r in rs):.1f} |")
    lines += ["", "Fixed rules over the same window (no search):", "",
              "| rule | search loss | confirm loss | ood loss |", "| --- | --- | --- | --- |"]
    lines += [f"| {label} | {s:.4f} | {c:.4f} | {o:.4f} |" for label, (s, c, o) in bases.items()]
    sched = [r.trials_to(target) for r in runs if (r.space, r.sampler) == ("schedule", "gp")]
    med = statistics.median(sched)
    lines += ["", f"- {'PASS' if med <= 20 else 'MISS'}: `schedule` (GP) reaches the simplex GP's best confirm "
              f"loss ({target:.4f}) in at most half the trials (20 of 40): trials needed per seed {sched} "
              f"(41 = not within 40), median {med:g}.", "",
              f"Machine: {machine}. Command: `python benchmarks/search_bench.py --schedule"
              f"{' --quick' if args.quick else ''}` (seeds {args.seeds}, max_eval_tokens {args.max_eval_tokens}). "
              f"Wall time {seconds / 60:.1f} min ({obj.calls} search-part evaluations, "
              f"{obj.seconds / max(obj.calls, 1):.2f} s each on average)."]
    return "\n".join(lines) + "\n"


def combos(args) -> list[tuple[str, str]]:
    if not getattr(args, "schedule_combos", None):
        return COMBOS
    chosen = [tuple(c.split("/")) for c in args.schedule_combos.split(",")]
    assert ("simplex", "gp") in chosen, "--schedule-combos needs simplex/gp: the target is its confirm loss"
    return chosen


def main(args, build_trajectory, sampler_for, machine, out: Path, log) -> None:
    start = time.perf_counter()
    root = build_trajectory()
    names = args.schedule_revisions.split(",") if getattr(args, "schedule_revisions", None) else None
    obj = Objective(root, out / "schedule_bench", args.max_eval_tokens, args.batch_size, names)
    log(f"window {obj.names[0]}..{obj.names[-1]}: {len(obj.ev.objective.blocks)} search and "
        f"{obj.ev.confirm_size} confirm {obj.ev.objective.confirm_unit}")
    bases = baselines(obj)
    runs = []
    for kind, sampler in combos(args):
        for seed in range(args.seeds):
            run = one_run(obj, kind, sampler, seed, sampler_for)
            runs.append(run)
            log(f"{kind} {sampler} seed {seed}: search {run.at(40)[0]:.4f} confirm {run.at(40)[1]:.4f} "
                f"({run.seconds:.1f} s)")
    text = report(runs, bases, args, time.perf_counter() - start, obj, machine())
    print(text)
    path = out / ("schedule_bench-quick.md" if args.quick else "schedule_bench.md")
    path.write_text(text)
    path.with_suffix(".json").write_text(json.dumps({"runs": [dataclasses.asdict(r) for r in runs],
                                                     "baselines": bases, "seeds": args.seeds,
                                                     "max_eval_tokens": args.max_eval_tokens}, indent=1))
    log(f"wrote {path}")
