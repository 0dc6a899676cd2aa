#!/usr/bin/env bash
# The scaling-law benchmark: the default ladder (6 sizes), the 4-point batch sweep, then the fit with the
# largest model held out. Prints the wall time of each part; the fit writes OUT/fit/fit.json and the plots.
#   LAB_DATA_DIR=/path/to/data bash benchmarks/scaling_law.sh [OUT]      (or: make scaling-law)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-logs/scaling_law_benchmark}"
PY="${PY:-.venv/bin/python}"
rm -rf "$OUT"
start=$(date +%s)
"$PY" run.py -m experiment=scaling_law hydra.sweep.dir="$OUT/ladder"
ladder=$(date +%s)
"$PY" run.py -m experiment=scaling_law_batch hydra.sweep.dir="$OUT/batch"
batch=$(date +%s)
"$PY" -m lab.methods.scaling_law.fit "$OUT/ladder" "$OUT/batch" --out "$OUT/fit"
end=$(date +%s)
echo "ladder sweep: $((ladder - start)) s, batch sweep: $((batch - ladder)) s, fit: $((end - batch)) s, total: $((end - start)) s"
