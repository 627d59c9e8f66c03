#!/usr/bin/env bash
# Pythia-1B: merge late checkpoints of one run (the BO-merging paper merges adjacent late ones; PMA averages more).
# Needs: ~8 x 2 GB of downloads (fp16 .bin per step branch), ~20 GB RAM on CPU (8 resident fp16 checkpoints
# + the float32 model), or one 24 GB GPU. Time per trial with the default 16k eval tokens (benchmarks/README.md):
# ~0.1 s on an H100 (measured forward 230k tokens/s in bf16, re-merge 21-27 ms for 4 checkpoints; twice the
# re-merge for 8), so downloads and the model load dominate; ~30 min on a loaded 2-core CPU (measured at the
# 160m shape, scaled by FLOPs): use a GPU, or --max-eval-tokens 4096 there. `--dry-run` prints the estimate
# for your machine (calibrated on it in seconds, nothing downloaded).
set -euo pipefail
hf-bomerge EleutherAI/pythia-1b \
  --revisions step100000..step143000 --max-checkpoints 8 \
  --trials 24 \
  --eval-dataset Salesforce/wikitext:wikitext-103-raw-v1@test \
  --output pythia-1b-bomerge "$@"
