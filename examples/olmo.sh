#!/usr/bin/env bash
# OLMo: branches are named like `step20000-tokens84B` (OLMo 1) or `stage1-step928646-tokens3896B` (OLMo 2);
# ranges follow training order (stage first, then step), not string order. `last:4` takes the 4 latest.
# Needs: 4 x ~4.7 GB downloads for OLMo-1B (fp32), ~25 GB RAM on CPU or a 24 GB GPU.
set -euo pipefail
hf-bomerge allenai/OLMo-1B-hf --revisions last:4 --search simplex --trials 20 \
  --output olmo-1b-bomerge "$@"
