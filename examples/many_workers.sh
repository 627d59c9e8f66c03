#!/usr/bin/env bash
# One study, many workers: run this same script on every GPU host (or several times on one host). They
# share the 40-trial budget through PostgreSQL (no overshoot, the baselines enqueued once, a dead worker's
# trial re-run by another), and exactly one of them exports and pushes when the budget is spent.
# Needs: pip install "hf-bomerge[postgres]", a PostgreSQL database every host reaches (DB_URL), and per host
# what one Pythia-1B search needs (8 resident fp16 checkpoints: ~18 GB on the GPU).
set -euo pipefail
DB_URL=${DB_URL:-postgresql+psycopg://bomerge@db-host/bomerge}
hf-bomerge EleutherAI/pythia-1b --revisions step100000..step143000 --trials 40 \
  --storage "$DB_URL" --study-name pythia-1b-100k-143k --output pythia-1b-bomerge "$@"
# Afterwards, from anywhere:
#   hf-bomerge show --storage "$DB_URL" --study-name pythia-1b-100k-143k
#   hf-bomerge export --storage "$DB_URL" --study-name pythia-1b-100k-143k --output again --push-to-hub ME/pythia-1b-bomerge
