#!/usr/bin/env bash
# Issue 26's GPU measurements in one go (about 8 minutes on one H100/H200), written to $RESULTS (default
# benchmarks/out/gpu_check, or $OUT/gpu_check on a lent machine). Run from the repository root:
#
#     bash benchmarks/gpu_check.sh            # needs CUDA; CPU_ONLY=1 runs only the parts a CPU can (a smoke run)
#
# 1. the N-way trial re-merge at Pythia-1B shapes, N = 2, 4, 8, against the copy-bandwidth bound, and the bf16
#    evaluation forward (no KV cache) against the dense peak: benchmarks/gpu_bench.py
# 2. the resident merger on the GPU bit for bit against the CPU export (the engine's test, HF_BOMERGE_TEST_DEVICE)
# 3. one trial at Pythia-1B shapes, measured and as the dry-run estimate predicts: benchmarks/trial_bench.py
# 4. one end-to-end search of that Pythia-1B-shaped trajectory: wall time against `--dry-run`'s estimate
# 5. `--device-map auto` (checkpoints resident beside an Accelerate-placed model) against the plain one-device run
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-${OUT:+$OUT/gpu_check}}
RESULTS=${RESULTS:-benchmarks/out/gpu_check}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
PY=${PYTHON:-python}
status=0
step() {  # step NAME SECONDS COMMAND...: its output in $RESULTS/NAME.log, its time and exit status in summary.txt
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$RESULTS/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - start)) s" | tee -a "$RESULTS/summary.txt"
  [ "$rc" -eq 0 ] || status=1
}
: >"$RESULTS/summary.txt"
$PY -c 'import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())' \
  | tee "$RESULTS/device.txt"

if [ -z "${CPU_ONLY:-}" ]; then
  nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv >>"$RESULTS/device.txt" 2>&1
  for n in 2 4 8; do
    step "remerge_n$n" 90 $PY benchmarks/gpu_bench.py --n "$n" --repeat 10 --batch 8
  done
  HF_BOMERGE_TEST_DEVICE=cuda step bit_for_bit_cuda 120 $PY -m pytest -q -p no:cacheprovider tests/test_engine.py -k bit_for_bit
  DEVICE=cuda SHAPE=1b TRIALS=8 TOKENS=16384
else
  HF_BOMERGE_TEST_DEVICE=cpu step bit_for_bit_cpu 120 $PY -m pytest -q -p no:cacheprovider tests/test_engine.py -k bit_for_bit
  DEVICE=cpu SHAPE=${SHAPE:-70m} TRIALS=${TRIALS:-6} TOKENS=${TOKENS:-1024}
fi

# builds benchmarks/out/trial-$SHAPE (4 fp16 checkpoints, tokenizer) and benchmarks/out/trial-heldout.txt, cached
step "trial_$SHAPE" 240 $PY benchmarks/trial_bench.py --shape "$SHAPE" --trials 3 --device "$DEVICE" --max-eval-tokens "$TOKENS"
ROOT=benchmarks/out/trial-$SHAPE
ARGS=("$ROOT" --revisions step1000..step4000 --dataset benchmarks/out/trial-heldout.txt --device "$DEVICE"
      --max-eval-tokens "$TOKENS" --cache-dir benchmarks/out/cache --quiet --json)
step dry_run 120 $PY -m hf_bomerge.cli "${ARGS[@]}" --trials "$TRIALS" --dry-run
rm -rf "$RESULTS/search" "$RESULTS/plain" "$RESULTS/mapped"
STUDY="gpu-check-$(date +%s)"  # a fresh study: a resumed one would run no trial
step search 300 $PY -m hf_bomerge.cli "${ARGS[@]}" --trials "$TRIALS" --study-name "$STUDY" --output "$RESULTS/search"
step plain 120 $PY -m hf_bomerge.cli "${ARGS[@]}" --method wma --output "$RESULTS/plain"
step device_map_auto 120 $PY -m hf_bomerge.cli "${ARGS[@]}" --method wma --device-map auto --output "$RESULTS/mapped"

$PY - "$RESULTS" <<'EOF' | tee -a "$RESULTS/summary.txt"
import json, pathlib, re, sys
out = pathlib.Path(sys.argv[1])
def last_json(name):
    lines = [l for l in (out / f"{name}.log").read_text().splitlines() if l.startswith("{")]
    return json.loads(lines[-1]) if lines else None
for name in ("remerge_n2", "remerge_n4", "remerge_n8"):
    log = out / f"{name}.log"
    if log.is_file():
        print(name, *[l for l in log.read_text().splitlines() if l.startswith("| N=") or l.startswith("| pair")
                      or l.startswith("| batch")], sep="\n  ")
plan, search = last_json("dry_run"), (out / "search.log").read_text()
took = re.search(r"search: exit 0 in (\d+) s", (out / "summary.txt").read_text())
if plan and plan.get("estimate") and took:
    est = plan["estimate"].get("search_s") or plan["estimate"]
    print(f"end-to-end search: {took.group(1)} s wall (process start to exit), dry-run estimate {est}")
print("plan memory:", plan and {k: plan.get(k) for k in ("mode", "resident_bytes", "rescore_mode", "rescore_bytes",
                                                           "memory_available")})
plain, mapped = last_json("plain"), last_json("device_map_auto")
if plain and mapped:
    print(f"--device-map auto loss {mapped['loss']!r} vs one device {plain['loss']!r}: "
          f"{'EQUAL' if mapped['loss'] == plain['loss'] else 'DIFFERENT'}")
EOF
exit $status
