#!/usr/bin/env bash
# `make bench-gpu`: the GPU benchmarks in one call on one H100 or H200 (<= 600 s); JSON and
# log.txt into $1 (at most 8 files, what the device tool brings back). Each benchmark prints its
# own table into log.txt; the summary against the targets is printed last.
#   device tool: PYTHONPATH=$PWD make bench-gpu PYTHON=python3 BENCH_OUT=$OUT   (timeout 600)
set -u
OUT=${1:-runs/bench}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=9.0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
BUDGET=${BENCH_BUDGET_S:-560}  # optional steps are skipped once they could overrun this

run() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s, at ${SECONDS}s)" | tee -a "$OUT/log.txt"
  timeout "$limit" "$PY" "$@" >>"$OUT/log.txt" 2>&1 || echo "=== $name exited $?" | tee -a "$OUT/log.txt"
}
optional() {  # like run, but only while the budget allows
  if (( SECONDS + $2 > BUDGET )); then echo "=== $1 skipped (budget)" | tee -a "$OUT/log.txt"; else run "$@"; fi
}

nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv >>"$OUT/log.txt" 2>&1
# the benchmark the product path is compared with: compiled decoder layers, 32k-token micro-batches
run throughput-7b-compile 130 bench/train_throughput.py --shape 7b --layers 8 --row-len 32768 --steps 3 --warmup 2 \
    --variants ours-compile --out "$OUT/throughput_7b_compile_32k.json"
# the commands users run: pretokenize on mixed-size JPEGs, unitoken train stages 1 and 2 of
# unitoken-7b-fast at 8 layers with nothing set but layers and steps (memory plan, ZeRO-2, compile),
# step 3 profiled. Each `unitoken train` process costs ~100 s besides its steps on an H100 (start-up,
# DeepSpeed, compilation, the hand-off: measured 2026-12-06, session 12), so the staged saves at 1
# layer are a part of their own, run while the budget allows.
run product-path 460 bench/product_path.py --out "$OUT" --parts loop --layers 8 --steps 5 --scenes 200 --profile-step 2
# the rest only while the budget allows (BENCH_BUDGET_S): the train/serve skew check of the 7B encoder
# (stored codes == inference codes on 256 images at 512 px, bf16, compiled: ~60 s), then the saves
optional gpu-skew 100 -m pytest -q -s -m gpu tests/gpu -k "codes_equal" -p no:cacheprovider
optional product-path-ckpt 300 bench/product_path.py --out "$OUT/ckpt" --parts ckpt --ckpt-layers 1 --scenes 100 \
    --save-every 2
optional throughput-7b 150 bench/train_throughput.py --shape 7b --layers 8 --steps 3 --warmup 1 \
    --variants reference,ours,ours-nochunk,ours-sdpa,ours-ckpt-half,anchor-ckpt,anchor,anchor-ours \
    --out "$OUT/throughput_7b.json"
optional vq-encode 90 bench/vq_encode.py --variants bf16-autocast,bf16-compiled --out "$OUT/vq_encode.json"
"$PY" bench/perf_summary.py "$OUT"
