#!/usr/bin/env bash
# The tiny recipe end to end on one GPU: data -> VQ tokenizer -> stages 1-3 -> eval of the random
# init, stage 1 and stage 3 -> gate (stage 3 vs stage 1). Writes eval reports under OUT.
#   bash bench/tiny_end_to_end.sh OUT [S1_STEPS S2_STEPS S3_STEPS]
set -euo pipefail
OUT=${1:-runs/tiny_e2e}; S1=${2:-100}; S2=${3:-1200}; S3=${4:-300}
U="python3 -m unitoken.cli"
W=${WORK:-/tmp/tiny_e2e}
mkdir -p "$OUT" "$W"
$U data synth --out "$W/d" --n 2000 --size 64 > /dev/null
$U tokenizer train --data "$W/d" --out "$W/vq" --recipe tiny --steps 2000 --batch-size 64 | tail -4
$U model init --recipe tiny --tokenizer "$W/vq" --out "$W/m" > /dev/null
$U data pretokenize "$W/d/manifest.jsonl" --model "$W/m" --out "$W/p" --batch-size 256 | tail -3
BF16="--set train.precision=bf16 --set train.zero_stage=2"
$U train --stage 1 --recipe tiny --data "$W/p" --out "$W/s1" --init "$W/m" --no-track --max-steps $S1 $BF16 \
   --set train.stage1.batch_size=32 | tail -3
$U train --stage 2 --recipe tiny --data "$W/p" --out "$W/s2" --init "$W/s1/handoff" --no-track --max-steps $S2 $BF16 \
   --set train.stage2.batch_size=32 --set train.save_every=500 | tail -3
$U train --stage 3 --recipe tiny --data "$W/p" --out "$W/s3" --init "$W/s2/handoff" --no-track --max-steps $S3 $BF16 \
   --set train.stage3.batch_size=32 --set train.save_every=500 | tail -3
for m in m s1/handoff s3/handoff; do
  name=$(echo "$m" | cut -d/ -f1)
  $U eval --model "$W/$m" --suite shapes-vqa,shapes-geneval --data "$W/d" --out "$OUT/eval_$name" --limit 80 \
     --top-k 32 | tail -8
done
$U gate --candidate "$OUT/eval_s3" --champion "$OUT/eval_s1" --out "$OUT/gate_s3_vs_s1.json" || true
cp "$W"/s*/metrics.jsonl "$OUT/" 2>/dev/null || true
for s in 1 2 3; do cp "$W/s$s/metrics.jsonl" "$OUT/metrics_s$s.jsonl"; done
cp "$W/vq/report.json" "$OUT/vq_report.json"
