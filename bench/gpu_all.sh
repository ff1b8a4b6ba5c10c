#!/usr/bin/env bash
# `make bench-gpu`: every GPU benchmark of issue 8 in one call on one H200 (~6 minutes); JSON and
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
# reference batching vs ours on the same samples in one process (eager), plus the anchor
run throughput-7b 150 bench/train_throughput.py --shape 7b --layers 8 --steps 3 --warmup 1 \
    --variants reference,ours,ours-nochunk,ours-sdpa,ours-ckpt-half,anchor-ckpt,anchor,anchor-ours \
    --out "$OUT/throughput_7b.json"
# compiled decoder layers (in place, so a process of its own), 32k-token micro-batches
run throughput-7b-compile 120 bench/train_throughput.py --shape 7b --layers 8 --row-len 32768 --steps 3 --warmup 2 \
    --variants ours-compile --out "$OUT/throughput_7b_compile_32k.json"
# issue 23: the commands users run (pretokenize on mixed-size JPEGs, unitoken train with the 7B
# layer shape x 8 and compile on, the blocking time per save in the loop), beside the benchmark above
run product-path 240 bench/product_path.py --out "$OUT"
run vq-encode 60 bench/vq_encode.py --variants fp32-single,bf16-autocast,bf16-cl --out "$OUT/vq_encode.json"
optional vq-compile 60 bench/vq_encode.py --cudnn-benchmark --variants bf16-autocast,bf16-cl-compile \
    --out "$OUT/vq_encode_cudnn.json"
optional checkpoint-io 130 bench/checkpoint_io.py --layers 1 --dir /tmp/unitoken-ckpt-bench \
    --out "$OUT/checkpoint_io.json"
optional throughput-small 40 bench/train_throughput.py --shape small --samples 96 --row-len 4096 --rows 4 \
    --ref-batch 16 --steps 3 --warmup 1 --variants reference,ours,anchor-ckpt,anchor,anchor-ours \
    --out "$OUT/throughput_small.json"
"$PY" bench/perf_summary.py "$OUT"
