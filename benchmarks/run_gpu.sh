#!/usr/bin/env bash
# On a CUDA machine with torch, nvcc, ninja, pytest, hypothesis and pytest-benchmark installed: builds the
# extension in place, runs the CUDA tests and the GPU benchmarks, and writes every log under $OUT
# (default: gpu-logs/). What it prints is what benchmarks/RESULTS.md's GPU section is made from.
#
#   OUT=gpu-logs bash benchmarks/run_gpu.sh [quick]
#
# "quick" skips the 1 B-score selection and the ResNet50 scoring (for a short device slot).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-logs}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1 || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee -a "$out/gpu.txt"

python -m pip install --no-build-isolation -e . > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }

# The CUDA cases of the op tests (the CPU ones run in CI), then the whole suite.
python -m pytest tests/ops -q -k cuda 2>&1 | tee "$out/tests_cuda_ops.log" | tail -5
python -m pytest tests -q 2>&1 | tee "$out/tests_all.log" | tail -5

select=()
if [[ "${1:-}" == "quick" ]]; then
  select=(-k "not 1B and not resnet50")
fi
python -m pytest benchmarks/test_gpu_scoring.py "${select[@]}" --benchmark-group-by=group \
  --benchmark-columns=median,iqr,rounds --benchmark-json "$out/gpu_scoring.json" 2>&1 \
  | tee "$out/gpu_scoring.log" | tail -60
