#!/usr/bin/env bash
# Stages 1 -> 2 -> 3 of the tiny recipe in bf16 / ZeRO-2 on one GPU, then 50 steps of `small`
# stage 2 with packing: a smoke test of the GPU training path and a first throughput reading.
#   bash bench/gpu_stages.sh OUT_DIR        (on the GPU machine; MLflow is not needed: --no-track)
set -euo pipefail
OUT=${1:-runs/gpu_stages}
U="python3 -m unitoken.cli"
mkdir -p "$OUT"
$U data synth --out "$OUT/d64" --n 300 --size 64 > /dev/null
$U model init --recipe tiny --out "$OUT/m_tiny" > /dev/null
$U data pretokenize "$OUT/d64/manifest.jsonl" --model "$OUT/m_tiny" --out "$OUT/p64" > /dev/null
init="$OUT/m_tiny"
for stage in 1 2 3; do
  $U train --stage $stage --recipe tiny --data "$OUT/p64" --out "$OUT/tiny_s$stage" --init "$init" --no-track \
     --set train.precision=bf16 --set train.zero_stage=2
  init="$OUT/tiny_s$stage/handoff"
done
$U data synth --out "$OUT/d128" --n 400 --size 128 > /dev/null
$U model init --recipe small --out "$OUT/m_small" > /dev/null
$U data pretokenize "$OUT/d128/manifest.jsonl" --model "$OUT/m_small" --out "$OUT/p128" > /dev/null
$U train --stage 1 --recipe small --data "$OUT/p128" --out "$OUT/small_s1" --init "$OUT/m_small" --no-track --max-steps 2
$U train --stage 2 --recipe small --data "$OUT/p128" --out "$OUT/small_s2" --init "$OUT/small_s1/handoff" --no-track \
   --max-steps 50
python3 - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(x) for x in open(f"{sys.argv[1]}/small_s2/metrics.jsonl")][10:]
print("small stage 2 (steps 11-50): median tokens/s", statistics.median(r["tokens_per_s"] for r in rows),
      "median MFU", statistics.median(r.get("mfu", 0) for r in rows), "final loss", rows[-1]["loss"])
PY
