"""Where `export_merge`'s time and memory go (the profiling behind benchmarks/README.md).

    python benchmarks/profile_export.py          # after merge_bench.py has built benchmarks/out/ckpts

Each variant runs in its own process under /usr/bin/time -v (peak RSS per process) on the four cached
checkpoints. Variants patch hf_bomerge from the outside, to measure what a change to engine.py would buy;
the package itself is not modified:
  baseline  export_merge as it is, with section timers (read = first touch of the mmap'd source pages)
  nofsync   os.fsync made a no-op (mergekit and transformers' save_pretrained do not fsync)
  fused     merged_tensor cache-blocked: the same ops per chunk of FUSED_CHUNK elements (default 256 Ki:
            a 1 MiB float32 accumulator that stays in L2), one reused accumulator, cast into the output
            chunk by chunk, finiteness checked per chunk; same bits as baseline (checked)
"""

from __future__ import annotations

import filecmp
import json
import mmap
import os
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bench import CKPTS, OUT, REVISIONS, WEIGHTS, timed  # noqa: E402

VARIANTS = ["baseline", "nofsync", "fused", "fused+nofsync"]
CHUNK = int(os.environ.get("FUSED_CHUNK", 1 << 18))


def fused_merged_tensor(eng, ckpts, name, weights, dtype):
    info = ckpts.infos[name]
    name = ckpts.aliases.get(name, name)
    if not eng.is_merged(info):
        return ckpts.reference.get(name)
    srcs = [t.reshape(-1) for t in ckpts.tensors(name)]
    out = torch.empty(info.shape, dtype=dtype or info.dtype)
    flat, n, finite = out.view(-1), out.numel(), True
    for o in range(0, n, CHUNK):
        acc = _ACC[: min(CHUNK, n - o)]
        eng.weighted_sum_([acc], [[s[o:o + CHUNK]] for s in srcs], weights)
        finite = finite and bool(torch.isfinite(acc).all())
        flat[o:o + CHUNK].copy_(acc)
    del srcs
    ckpts.release(name)
    if not finite:
        raise eng.CheckpointError(f"Merging {name!r} overflowed to inf.")
    return out


_ACC = torch.empty(CHUNK)


def run(variant: str, out_dir: str) -> None:
    import hf_bomerge.engine as eng
    from hf_bomerge.checkpoints import CheckpointSet

    sections: dict[str, float] = defaultdict(float)

    def timer(key, fn):
        def wrapped(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sections[key] += time.perf_counter() - t
        return wrapped

    ckpts = CheckpointSet([CKPTS / r for r in REVISIONS])
    tensors, page = ckpts.tensors, mmap.PAGESIZE

    def touched(name):  # fault the mmap'd pages in here, so "read" is the cost of reading them
        ts = tensors(name)
        for t in ts:
            t.reshape(-1)[:: max(1, page // t.element_size())].sum()
        return ts
    ckpts.tensors = timer("read (mmap faults)", touched)
    eng.weighted_sum_ = timer("weighted_sum_ (fp32)", eng.weighted_sum_)
    eng._write_bytes = timer("write (to page cache)", eng._write_bytes)
    eng.os.fsync = (lambda fd: None) if "nofsync" in variant else timer("fsync", os.fsync)
    merged = eng.merged_tensor
    if "fused" in variant:
        def merged(c, name, weights, dtype):
            return fused_merged_tensor(eng, c, name, weights, dtype)
    eng.merged_tensor = timer("merged_tensor", merged)
    t = time.perf_counter()
    eng.export_merge(ckpts, WEIGHTS, out_dir, dtype=torch.float16)
    total = time.perf_counter() - t
    sec = dict(sections)
    sec["rest of merged_tensor (alloc, isfinite, release, cast)"] = (
        sec.pop("merged_tensor") - sec["weighted_sum_ (fp32)"] - sec["read (mmap faults)"])
    sec["export_merge total"] = total
    print(json.dumps(sec))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--variant":
        return run(sys.argv[2], sys.argv[3])
    rows = ["| variant | wall s | CPU s | peak RSS GiB | output = baseline's | export_merge sections (s) |",
            "| --- | --- | --- | --- | --- | --- |"]
    base = OUT / "profile-baseline"
    for v in VARIANTS:
        out = OUT / f"profile-{v}"
        shutil.rmtree(out, ignore_errors=True)
        r = timed([sys.executable, __file__, "--variant", v, str(out)], "profile")
        if r["rc"]:
            sys.exit(r["stderr"])
        same = filecmp.cmp(out / "model.safetensors", base / "model.safetensors", shallow=False)
        sec = ", ".join(f"{k} {s:.2f}" for k, s in r["info"].items())
        rows.append(f"| {v} | {r['wall']:.2f} | {r['cpu']:.1f} | {r['rss']:.2f} | {same} | {sec} |")
        print(rows[-1], file=sys.stderr, flush=True)
        if out != base:
            shutil.rmtree(out)
    shutil.rmtree(base)
    print(f"load average {os.getloadavg()[0]:.2f}; FUSED_CHUNK={CHUNK}\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
