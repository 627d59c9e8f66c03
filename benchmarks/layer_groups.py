"""Layer groups: does a depth-wise search (`--layer-groups G`) beat global weights on the confirm part?

    python benchmarks/layer_groups.py                 # 3 seeds x budgets 20/40, G=2
    python benchmarks/layer_groups.py --seeds 0 --budgets 12   # a smoke run

What it does: the demo trajectory (`hf_bomerge.demo.build_trajectory()`, a tiny GPT-NeoX with 2 blocks trained
at a constant LR), its last 4 revisions, the held-out validation.jsonl split 3:1 into a search and a confirm
part (the default), and ood.jsonl as the out-of-domain set. One `Evaluator` (the one `hf_bomerge.search`
builds: resident model, resident merger, packed blocks) serves every run. For each seed, `study.run_search`
(the GP, baselines enqueued first) with global weights (the simplex space, 4 dimensions) and with the layered
space of `layer_groups=G` (8 dimensions). Budget B = the best of the study's first B trials (the GP's first
B trials do not depend on the budget). The chosen merge and every baseline are then scored on the confirm
part (paired bootstrap interval, `confirm.confirm`) and on ood. An evaluation cache keyed by the weights saves
re-scoring the baselines every run (the objective is deterministic).
Writes a markdown table to stdout and benchmarks/out/layer_groups.md, every number to layer_groups.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import optuna
import torch

from hf_bomerge import demo
from hf_bomerge.merging.layers import LayerGroups, LayerWeights
from hf_bomerge.objectives.confirm import confirm
from hf_bomerge.objectives.evaluator import CONFIRM
from hf_bomerge.objectives.heldout import HeldOutSpec
from hf_bomerge.prepare import prepare
from hf_bomerge.searching.study import run_search
from hf_bomerge.searching.weight_spaces import Layered, make_space
from hf_bomerge.specs import EvalSpec, SourceSpec

OUT = Path(__file__).resolve().parent / "out"


def run(seeds: list[int], budgets: list[int], groups: int) -> list[dict]:
    torch.set_num_threads(1)  # the machine is shared; one thread contends least
    root = demo.build_trajectory(quiet=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="layer-groups-") as tmp:
        spec = EvalSpec(HeldOutSpec.parse(str(root / "heldout" / "validation.jsonl"), "text"), confirm_fraction=0.25)
        prep = prepare(str(root), "last:4", 8, None, tmp, False, planning=spec.planning())
        evaluator = spec.evaluator(prep, Path(tmp), SourceSpec(str(root)))
        ood = HeldOutSpec.parse(str(root / "heldout" / "ood.jsonl"), "text")
        rule = LayerGroups.from_names(groups, prep.ckpts.merged_names)
        sizes = rule.sizes({n: prep.ckpts.infos[n].numel for n in prep.ckpts.merged_names})
        spaces = {"global": make_space("simplex", 4), f"layers G={groups}": Layered(4, groups=rule, sizes=sizes)}
        cache: dict = {}

        def scored(w, data=None):
            key = (json.dumps(w.as_dict() if isinstance(w, LayerWeights) else [float(x) for x in w]), str(data))
            if key not in cache:
                cache[key] = evaluator(w, data)
            return cache[key]

        seeds_w = dict(spaces["global"].seeds(prep.names))
        base_confirm = {k: scored(w, CONFIRM) for k, w in seeds_w.items()}
        for seed in seeds:
            for method, space in spaces.items():
                start = time.monotonic()
                outcome = run_search(scored, space, prep.names, trials=max(budgets), seed=seed, progress=False,
                                     storage=optuna.storages.InMemoryStorage(), study_name=f"{method}-{seed}", inputs={})
                seconds = round(time.monotonic() - start, 1)
                for budget in sorted(budgets):
                    best = min((t for t in outcome.trials if t.number < budget), key=lambda t: t.loss)
                    w = (LayerWeights.from_dict(rule, best.layer_weights) if best.layer_weights else best.weights)
                    c = confirm(scored(w, CONFIRM), base_confirm, evaluator.objective.statistic)
                    rows.append({"seed": seed, "method": method, "budget": budget, "search": best.loss,
                                 "confirm": c.loss, "best_baseline": c.best_baseline,
                                 "confirm_baseline": c.baselines[c.best_baseline],
                                 "interval": list(c.interval) if c.interval else None,
                                 "ood": scored(w, ood), "ood_uniform": scored(seeds_w["uniform"], ood),
                                 "weights": best.weights, "layer_weights": best.layer_weights, "trial": best.number,
                                 "search_seconds": seconds})
                    print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    def mean(xs):
        return statistics.fmean(xs)

    lines = ["| method | budget | search loss | confirm loss | confirm − best baseline | seeds better on confirm | "
             "ood loss |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    keys = sorted({(r["method"], r["budget"]) for r in rows}, key=lambda k: (k[1], k[0] != "global"))
    for method, budget in keys:
        sel = [r for r in rows if (r["method"], r["budget"]) == (method, budget)]
        delta = [r["confirm"] - r["confirm_baseline"] for r in sel]
        lines.append(f"| {method} | {budget} | {mean([r['search'] for r in sel]):.5f} | "
                     f"{mean([r['confirm'] for r in sel]):.5f} | {mean(delta):+.5f} | "
                     f"{sum(d < 0 for d in delta)}/{len(sel)} | {mean([r['ood'] for r in sel]):.5f} |")
    base = rows[0]
    lines += ["", f"Best baseline on the confirm part: {base['best_baseline']} {base['confirm_baseline']:.5f}; "
              f"uniform on ood: {base['ood_uniform']:.5f}.", "",
              "Layered − global, paired by seed and budget (confirm loss; negative: layer groups better):", ""]
    for budget in sorted({r["budget"] for r in rows}):
        diffs = []
        for seed in sorted({r["seed"] for r in rows}):
            pair = {r["method"] == "global": r["confirm"] for r in rows if (r["seed"], r["budget"]) == (seed, budget)}
            if len(pair) == 2:
                diffs.append(pair[False] - pair[True])
        lines.append(f"- budget {budget}: " + ", ".join(f"{d:+.5f}" for d in diffs) + f" (mean {mean(diffs):+.5f})")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budgets", type=int, nargs="+", default=[20, 40])
    p.add_argument("--groups", type=int, default=2)
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    rows = run(args.seeds, args.budgets, args.groups)
    (OUT / "layer_groups.json").write_text(json.dumps(rows, indent=1) + "\n")
    text = table(rows)
    (OUT / "layer_groups.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
