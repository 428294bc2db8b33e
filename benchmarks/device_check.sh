#!/usr/bin/env bash
# The GPU check for a session lent a GPU (15 minutes of device time in all, start included): one call of about
# 9 minutes, most important first, every result written to $OUT as it is made. What it answers, in order:
#   1. end-to-end decode tokens/s of a Mixtral-width model, bf16 against packed int4 experts (the product claim);
#   2. the product kernels at Mixtral-8x7B shapes (int4, int2, ternary-b3; batch 1, 16, 512) against cuBLAS,
#      and the grouped MoE layer at T = 1..512 with the per-row GEMV against the sorted blocks at T <= 16
#      (the threshold in moecompress.kernels.routing.grouped_block_m);
#   3. where an eager decode product's host time goes (cProfile; 83 us per call against 27 for a bare launch);
#   4. the quantizer's wall time on the GPU: W2 default over plain GPTQ (issue 12's target: at most 2x), and
#      the GPU-quantized checkpoint evaluated and sampled there.
# Usage, from the repository root on the device machine (the device tool sets $OUT):
#   bash benchmarks/device_check.sh
# Wheels the machine lacks (pydantic and its needs, a transformers >= 5.23) go in .whl/ (see the device
# tool's README); they are installed into /tmp/site when present.
# Results of the first such session (a shorter plan, stop 33): benchmarks/results/gpu_h200/.
set -u
OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 3
  export PYTHONPATH=$PWD:/tmp/site
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"

timeout 330 python3 benchmarks/kernels_gpu.py --quick --sections e2e,gemm,grouped --codecs int4,int2,ternary-b3 \
  --budget 310 --e2e-layers 4 --e2e-tokens 32 --out "$OUT/kernels_gpu.json" > "$OUT/kernels_gpu.log" 2>&1
echo "kernels_gpu rc=$?"
tail -c 2500 "$OUT/kernels_gpu.log"

timeout 60 python3 benchmarks/gemv_variants.py --budget 15 --profile --out "$OUT/gemv_variants.json" \
  > "$OUT/gemv_variants.log" 2>&1
echo "gemv_variants rc=$?"
grep -A 3 "host profile" "$OUT/gemv_variants.log" | head -20

timeout 170 python3 benchmarks/pipeline_gpu.py --only quantize_w2a16,quantize_w2a16_plain_gptq --sides gpu \
  --workdir /tmp/pipe-gpu --out "$OUT/pipeline_gpu.json" > "$OUT/pipeline_gpu.log" 2>&1
echo "pipeline_gpu rc=$?"
tail -c 1500 "$OUT/pipeline_gpu.log"
