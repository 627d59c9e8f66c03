#!/usr/bin/env bash
# Baichuan2-7B intermediate checkpoints: branches `train_00220B` ... `train_02640B` (tokens seen).
# The model ships its own modeling code, so it needs --trust-remote-code (read that code first).
# Needs: 2 x ~15 GB downloads for a pairwise merge, 2 x 15 GB resident + the model: a 48 GB GPU, or
# --device-map auto across several GPUs. Pairwise merging of the two latest is the BO-merging paper's setup.
set -euo pipefail
hf-bomerge baichuan-inc/Baichuan2-7B-Intermediate-Checkpoints \
  --revisions train_02420B,train_02640B --search pairwise --lambda-min 0.3 --trials 12 \
  --trust-remote-code --output baichuan2-7b-bomerge "$@"
