"""Layer groups: does a depth-wise search (`--layer-groups G`) beat global weights on the confirm part?

    python benchmarks/layer_groups.py                 # 3 seeds x budgets 20/40, G=2 (about 10 min on 2 shared cores)
    python benchmarks/layer_groups.py --seeds 0 --budgets 12   # a smoke run

What it does: the demo trajectory (`hf_bomerge.demo.build_trajectory()`, a tiny GPT-NeoX with 2 blocks trained
at a constant LR), its last 4 revisions, the held-out validation.jsonl (3:1 search:confirm split, the default)
and ood.jsonl as the out-of-domain set. For each seed, `hf_bomerge.search` with global weights (the simplex
space, 4 dimensions) and with `layer_groups=G` (the layered space, 8 dimensions), both through the very same
pipeline (GP, baselines seeded first, the resident merger, the confirm part). A larger budget resumes the
same study (the study's budget is extended), so the budget-40 run's first 20 trials are the budget-20 run.
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

from hf_bomerge import api, demo  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


def run(seeds: list[int], budgets: list[int], groups: int) -> list[dict]:
    root = demo.build_trajectory(quiet=True)
    data = dict(dataset=str(root / "heldout" / "validation.jsonl"), eval_datasets=[str(root / "heldout" / "ood.jsonl")])
    rows = []
    with tempfile.TemporaryDirectory(prefix="layer-groups-") as tmp:
        storage = f"sqlite:///{tmp}/studies.db"
        for seed in seeds:
            for method, g in (("global", 0), (f"layers G={groups}", groups)):
                for budget in sorted(budgets):
                    start = time.monotonic()
                    r = api.search(str(root), "last:4", trials=budget, seed=seed, layer_groups=g, storage=storage,
                                   study_name=f"{method}-{seed}", cache_dir=f"{tmp}/cache", progress=False, **data)
                    c = r.confirm
                    rows.append({"seed": seed, "method": method, "budget": budget, "search": r.loss,
                                 "confirm": c["loss"], "best_baseline": c["best_baseline"],
                                 "confirm_baseline": c["baselines"][c["best_baseline"]], "interval": c["interval"],
                                 "ood": r.generalization["ood.jsonl"]["merged"],
                                 "ood_uniform": r.generalization["ood.jsonl"]["uniform"],
                                 "weights": r.weights, "layer_weights": r.layer_weights,
                                 "seconds": round(time.monotonic() - start, 1)})
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
