#!/usr/bin/env bash
# On a CUDA machine with torch, nvcc, ninja, pytest, hypothesis and pytest-benchmark installed: builds the
# extension in place, runs the CUDA tests and the GPU benchmarks, and writes every log under $OUT
# (default: gpu-logs/). What it prints is what benchmarks/RESULTS.md's GPU section is made from.
#
#   OUT=gpu-logs bash benchmarks/run_gpu.sh [quick]
#
# "quick" skips the 1 B-score selection, the ResNet50 scoring and the 99 % layers (for a short device slot).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-logs}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1 || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee -a "$out/gpu.txt"

python -m pip install --no-build-isolation -e . > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }

# The CUDA cases of the op tests (the CPU ones run in CI), the same under compute-sanitizer's memcheck, then
# the whole suite.
python -m pytest tests/ops -q -k cuda 2>&1 | tee "$out/tests_cuda_ops.log" | tail -5
if command -v compute-sanitizer > /dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 1 python -m pytest tests/ops -q -x -k cuda \
    > "$out/memcheck.log" 2>&1 && echo "memcheck clean" || { echo "memcheck FAILED"; tail -30 "$out/memcheck.log"; }
fi
python -m pytest tests -q 2>&1 | tee "$out/tests_all.log" | tail -5

select=()
if [[ "${1:-}" == "quick" ]]; then
  select=(-k "not 1B and not resnet50 and not 0.99")
fi
for suite in gpu_scoring gpu_sparse; do
  python -m pytest "benchmarks/test_$suite.py" "${select[@]}" --benchmark-group-by=group \
    --benchmark-columns=median,iqr,rounds --benchmark-json "$out/$suite.json" 2>&1 \
    | tee "$out/$suite.log" | tail -80
done
