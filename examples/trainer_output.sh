#!/usr/bin/env bash
# Your own run: an HF Trainer output folder with checkpoint-N subfolders. Only the weights are read;
# optimizer.pt / training_args.bin are never opened. Memory: N checkpoints of your model + one model.
set -euo pipefail
RUN=${1:?usage: trainer_output.sh OUTPUT_DIR_OF_TRAINER}
# A fixed PMA-style exponential moving average of the last 8 checkpoints, no search:
hf-bomerge "$RUN" --revisions last:8 --method ema --ema-alpha 0.2 --output "$RUN-ema"
# The GP search over the same checkpoints on your own held-out file:
hf-bomerge "$RUN" --revisions last:8 --dataset heldout.jsonl --trials 24 --output "$RUN-bomerge"
