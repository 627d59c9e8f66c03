"""The merge's inner loop in isolation: ns per element of `engine.merge_into` and of the operations it is made of,
on 4 fp16 sources of 50 M elements in memory (benchmarks/README.md, "Merge engine vs mergekit").

    python benchmarks/merge_step.py
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `hf-bomerge` sets it

import torch

from hf_bomerge.merging.engine import CHUNK, as_sources, merge_into, weighted_sum_

N = 50_000_000
WEIGHTS = [0.1, 0.2, 0.3, 0.4]


def per_element(fn, reps: int = 3) -> float:
    best = min(_timed(fn) for _ in range(reps))
    return best * 1e9 / N


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def chunked(op):
    acc = torch.empty(CHUNK)

    def run():
        for start in range(0, N, CHUNK):
            op(acc[: min(CHUNK, N - start)], start)
    return run


def main() -> None:
    g = torch.Generator().manual_seed(0)
    sources = [torch.randn(N, generator=g).half() for _ in WEIGHTS]
    out = torch.empty(N, dtype=torch.float16)
    rows = {
        "merge_into (the export: sum, check, round)": lambda: merge_into(out, as_sources([[s] for s in sources]),
                                                                          WEIGHTS, torch.float16),
        "merge_into, unchecked (a trial)": lambda: merge_into(out, as_sources([[s] for s in sources]), WEIGHTS,
                                                              torch.float16, check=False),
        "weighted_sum_ chunked (the sum alone)": chunked(
            lambda a, i: weighted_sum_([a], [[s[i:i + len(a)]] for s in sources], WEIGHTS)),
        "isfinite(chunk).all() (the former check)": chunked(lambda a, i: bool(torch.isfinite(a).all())),
        "chunk.sum() (the check now)": chunked(lambda a, i: float(a.sum())),
        "round fp32 -> fp16 (copy_)": chunked(lambda a, i: out[i:i + len(a)].copy_(a)),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {N / 1e6:.0f} M elements, "
          f"4 fp16 sources, chunks of {CHUNK} float32\n")
    print("| operation | ns / element (best of 3) |\n| --- | ---: |")
    for label, fn in rows.items():
        print(f"| {label} | {per_element(fn):.2f} |")


if __name__ == "__main__":
    main()
