set -x
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, triton, transformers, pydantic; print(torch.__version__, triton.__version__, transformers.__version__, pydantic.__version__)"
mkdir -p $OUT
timeout 300 python3 benchmarks/kernels_gpu.py --budget 255 --out $OUT/kernels_gpu.json > $OUT/kernels_gpu.log 2>&1; echo "kernels rc=$?"
tail -c 3000 $OUT/kernels_gpu.log
timeout 190 python3 benchmarks/pipeline_gpu.py --workdir /tmp/pipe-gpu --out $OUT/pipeline_gpu.json > $OUT/pipeline_gpu.log 2>&1; echo "pipeline rc=$?"
tail -c 3000 $OUT/pipeline_gpu.log
