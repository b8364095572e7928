#!/usr/bin/env bash
# Regenerates every benchmark result, then docs/benchmarks.md tables (results/*.json).
set -euo pipefail
cd "$(dirname "$0")"
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 MEDISTILL_DATA_DIR="${MEDISTILL_DATA_DIR:-$(cd ../.. && pwd)/shared/data}"
python throughput.py
python retinamnist_kd.py --epochs 10 --teacher-epochs 10 --seeds 0 1 2 --extra
python headroom.py            # ISIC 9-class: teacher ensemble, students alone vs distilled (hours on 2 cores)
python make_tables.py
