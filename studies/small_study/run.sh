#!/usr/bin/env bash
# The `small` recipe study (studies/small_study/study.py): data -> VQ-GAN -> init -> pre-tokenise, then
# on GPU 0 stage 1 -> 2 -> 3 with evaluation after each, on GPU 1 the Table 5/6 ablation (--main-only:
# one GPU). Every step is the pipeline's own (unitoken.pipeline.steps), run with no MLflow.
#   bash studies/small_study/run.sh OUT [extra `study.py run` args...]     (from the checkout's root)
# Resumable: the work dir (WORK, default runs/small_study_work) and the results (runs/small_study)
# persist on the machine between calls; each call copies the results into OUT.
# On the device machine, with the wheels of PLATFORM-NOTES carried in .whl (deepspeed & co).
set -euo pipefail
OUT=${1:-runs/small_study_out}; shift || true
if ! python3 -c "import deepspeed" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# Several torch processes share the host: without a cap each spins an OpenMP thread per core.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# Run 8 ran out of memory on an 80 GB H100 at stage 2's start (65 GiB allocated, 12 GiB reserved but
# fragmented); expandable segments let the same batch fit.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export PYTHONPATH=$PWD:${PYTHONPATH:-}
KEEP=${KEEP:-runs/small_study}
mkdir -p "$OUT" "$KEEP"
trap 'cp -f "$KEEP"/*.json "$KEEP"/*.tar.gz "$KEEP"/*.png "$KEEP"/log.txt "$OUT"/ 2>/dev/null || true' EXIT
python3 -m studies.small_study.study run --out "$KEEP" --work "${WORK:-runs/small_study_work}" "$@" 2>&1 \
  | tee -a "$KEEP/log.txt"
