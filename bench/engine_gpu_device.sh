#!/usr/bin/env bash
# The whole device call for bench/engine_gpu.py: install the carried wheels, check the versions,
# run the benchmark, keep its output under $OUT. Arguments go to engine_gpu.py.
#
# Prepare here first (the GPU machine reaches no registry; it has torch 2.11, transformers
# 5.17, huggingface-hub 1.33, tokenizers 0.23 and no structlog; .whl/ is in .gitignore):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl transformers==5.24.0 structlog==26.1.0
# then one `run` with carry [".whl"] and the command `bash bench/engine_gpu_device.sh`
# (13.6 MB of wheels; budget ~5 min of device time after the machine starts).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site
out="${OUT:-/tmp}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, transformers, structlog; print("torch", torch.__version__, "transformers", transformers.__version__)'
} 2>&1 | tee "$out/versions.txt"
timeout "${ENGINE_GPU_TIMEOUT_S:-540}" python3 bench/engine_gpu.py "$@" 2>&1 | tee "$out/engine_gpu.txt"
exit "${PIPESTATUS[0]}"
