"""The Python API: the same pipeline as the CLI, offline on the built-in demo trajectory.

Needs: ~1 GB RAM, about a minute on 2 CPU cores (the trajectory is trained on first use, then cached).
Run: python examples/python_api.py
"""

import hf_bomerge
from hf_bomerge.demo import build_trajectory

run = build_trajectory()  # a tiny GPT-NeoX trained on Python's stdlib, step250 ... step600
result = hf_bomerge.search(str(run), revisions="step450..step600", dataset=str(run / "heldout" / "validation.jsonl"),
                           eval_datasets=[str(run / "heldout" / "ood.jsonl")], trials=12, progress=False)
print("weights (oldest first):", dict(zip(result.revisions, [round(w, 3) for w in result.weights])))
print("merged loss:", round(result.loss, 4), "baselines:", {k: round(v, 4) for k, v in result.baselines.items()})
result.save_pretrained("demo-bomerge", overwrite=True)

ema = hf_bomerge.merge(str(run), "last:4", method="ema", dataset=str(run / "heldout" / "validation.jsonl"))
print("EMA of the last 4:", round(ema.loss, 4))
