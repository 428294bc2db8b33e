#!/usr/bin/env bash
# The GPU check for a session lent a GPU (15 minutes of device time in all, start included): one call of about
# 9 minutes, most important first, every result written to $OUT as it is made. What it answers, in order:
#   1. the trellis code (`quantize --codec trellis`, issue 12): its fused decode + product at Mixtral-8x7B shapes
#      against cuBLAS bf16 and int3, its Triton search against torch's, and trellis GPTQ against scalar GPTQ
#      on one Mixtral-width expert layer (benchmarks/trellis_gpu.py);
#   2. the quantizer's wall time on the GPU (issue 12's target: at most 2x plain GPTQ): the W2 default and the W3
#      trellis code, each over plain GPTQ at its width, the W2 checkpoint evaluated and sampled there;
#   3. end-to-end decode tokens/s of a Mixtral-width model, bf16 against packed int4 experts (the product claim),
#      and the product kernels at Mixtral-8x7B shapes (int4, int2, ternary-b3; batch 1, 16, 512) against cuBLAS,
#      with the grouped MoE layer at T = 1..512, as far as its budget goes.
# The host-time profile of stop 33 (benchmarks/gemv_variants.py --profile) is measured
# (benchmarks/results/gpu_h200/) and no longer run here.
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

timeout 110 python3 benchmarks/trellis_gpu.py --budget 90 --out "$OUT/trellis_gpu.json" > "$OUT/trellis_gpu.log" 2>&1
echo "trellis_gpu rc=$?"
tail -c 2000 "$OUT/trellis_gpu.log"

timeout 220 python3 benchmarks/pipeline_gpu.py --sides gpu --workdir /tmp/pipe-gpu --out "$OUT/pipeline_gpu.json" \
  --only quantize_w2a16,quantize_w2a16_plain_gptq,quantize_w3a16_trellis,quantize_w3a16_plain_gptq \
  > "$OUT/pipeline_gpu.log" 2>&1
echo "pipeline_gpu rc=$?"
tail -c 1500 "$OUT/pipeline_gpu.log"

timeout 230 python3 benchmarks/kernels_gpu.py --quick --sections e2e,gemm,grouped --codecs int4,int2,ternary-b3 \
  --budget 210 --e2e-layers 4 --e2e-tokens 32 --out "$OUT/kernels_gpu.json" > "$OUT/kernels_gpu.log" 2>&1
echo "kernels_gpu rc=$?"
tail -c 2500 "$OUT/kernels_gpu.log"
