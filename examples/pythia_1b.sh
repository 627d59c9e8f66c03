#!/usr/bin/env bash
# Pythia-1B: merge late checkpoints of one run (the BO-merging paper merges adjacent late ones; PMA averages more).
# Needs: ~8 x 2 GB of downloads (fp16 .bin per step branch), ~20 GB RAM on CPU (8 resident fp16 checkpoints
# + the float32 model), or one 24 GB GPU. Time: ~1-2 min per trial on a GPU with the default 16k eval tokens,
# far longer on CPU (use --max-eval-tokens 4096 there).
set -euo pipefail
hf-bomerge EleutherAI/pythia-1b \
  --revisions step100000..step143000 --max-checkpoints 8 \
  --trials 24 \
  --eval-dataset Salesforce/wikitext:wikitext-103-raw-v1@test \
  --output pythia-1b-bomerge "$@"
