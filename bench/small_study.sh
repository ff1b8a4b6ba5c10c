#!/usr/bin/env bash
# The `small` recipe study (bench/small_study.py): data -> VQ-GAN -> init -> pre-tokenise, then on
# GPU 0 stage 1 -> 2 -> 3 with evaluation after each, on GPU 1 the Table 5 ablation (--main-only: one GPU).
#   bash bench/small_study.sh OUT [extra small_study.py run args...]
# On the device machine, with the wheels of PLATFORM-NOTES carried in .whl (deepspeed & co).
set -euo pipefail
OUT=${1:-runs/small_study}; shift || true
if ! python3 -c "import deepspeed" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# Several torch processes share the host: without a cap each spins an OpenMP thread per core.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export PYTHONPATH=$PWD:${PYTHONPATH:-}
mkdir -p "$OUT"
python3 bench/small_study.py run --out "$OUT" --work "${WORK:-/tmp/small_study}" "$@" 2>&1 | tee "$OUT/log.txt"
