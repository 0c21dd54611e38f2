#!/usr/bin/env bash
# On one GPU: the GPU tests, the Mamba branch's kernels alone (bench/scan_time.py) and the training step at the
# every-block Hymba's shape (7 layers, SSM_INNER=512, SSM_STATE=8, 131,072 tokens) with the script's scan,
# mamba-ssm's and none (attention only). Full output under $OUT, the tables last.
#   OUT=results/ [MAMBA_WHEEL=path.whl] bash bench/kernel_check.sh
set -u
OUT=${OUT:-bench/results/kernel_check}; mkdir -p "$OUT"
if [ -n "${MAMBA_WHEEL:-}" ]; then
  python3 -m pip install -q --no-deps --no-index --target /tmp/site "$MAMBA_WHEEL" && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/machine.txt"
export PYTHONUNBUFFERED=1
timeout ${TEST_LIMIT:-260} python3 -m pytest -m gpu -q -s tests/test_gpu.py > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests rc $?: $(tail -1 "$OUT/gpu_tests.txt")"
timeout ${SCAN_LIMIT:-170} python3 bench/scan_time.py > "$OUT/scan_time.txt" 2>&1; echo "scan_time rc $?"
NUM_LAYERS=7 SSM_LAYERS=0,1,2,3,4,5,6 SSM_INNER=512 SSM_STATE=8 timeout ${STEP_LIMIT:-200} \
  python3 bench/step_time.py --steps 25 --warmup 6 --impls ${IMPLS:-triton,mamba_ssm,attention} > "$OUT/step_time.txt" 2>&1
echo "step_time rc $?"
grep -E "passed|failed|error" "$OUT/gpu_tests.txt" | tail -3
sed -n '/first call/p; /^shape/,$p' "$OUT/scan_time.txt"
sed -n '/^bf16 matmul/,$p' "$OUT/step_time.txt"
