#!/usr/bin/env bash
# On a CUDA machine with torch, nvcc, ninja, pytest, hypothesis and pytest-benchmark installed: builds the
# extension in place, runs the CUDA tests and the GPU benchmarks, and leaves every log in $OUT/gpu-logs.tar.gz
# (OUT defaults to gpu-logs/). What it prints is what benchmarks/RESULTS.md's GPU section is made from.
#
#   OUT=gpu-logs bash benchmarks/run_gpu.sh [stage ...]
#
# Stages, in the order given (default: all of them, in this order):
#   build       pip install --no-build-isolation -e . (CUDA archs of the visible GPU)
#   cuda-tests  every CUDA test case of the suite (pytest -k cuda)
#   memcheck    the CUDA op tests under compute-sanitizer's memcheck (fewer hypothesis examples); MEMCHECK_K="expr"
#               runs a subset (pytest -k) where the whole does not fit one call
#   all-tests   the whole suite
#   scoring     benchmarks/test_gpu_scoring.py
#   sparse      benchmarks/test_gpu_sparse.py (CIFAR shapes)
#   imagenet-masks  GraSP scoring of ResNet-50 and VGG16 at ImageNet shapes on the GPU, masks cached for the
#               stages below (GRASPEXT_BENCH_CACHE, default under the system's temp folder)
#   imagenet-layers / imagenet-layers-vgg  every distinct conv of ResNet-50 (batch 256) / VGG16 (batch 64) at
#               224x224, 90/95/98 %: dense TF32 and bf16 channels_last against the sparse and compact modes,
#               then the table of the mode chosen per layer (benchmarks/gpu_report.py)
#   imagenet-steps / imagenet-steps-vgg  their train steps, dense against measured-sparse, eager and CUDA graph
#   imagenet-targets  the shortest check of the targets: ResNet-50's largest-stage 3x3 layers and its train steps
#               at 95 and 98 % (eager), against both dense configurations
#   profile     torch.profiler tables of GraSP scoring on VGG19-CIFAR (benchmarks/profile_grasp_cuda.py)
#   profile-sparse  per-kernel times of sparse layers against cuDNN (benchmarks/profile_sparse_cuda.py)
#   backtrace   the C++/CUDA backtrace of one crashing test under cuda-gdb (BACKTRACE_TEST=node id)
#   distributed the DDP train step on every visible GPU with NCCL, dense against sparse, and the bytes per step
#               (benchmarks/distributed_step.py; needs 2 or more GPUs)
# BENCH_K="expr" narrows the benchmarks (pytest -k); STAGE_TIMEOUT (seconds, default 540) bounds each stage.
# Logs accumulate in LOGS (default /tmp/graspext-gpu-logs) across calls in one session of the machine.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-logs}
logs=${LOGS:-/tmp/graspext-gpu-logs}
mkdir -p "$out" "$logs"
trap 'tar czf "$out/gpu-logs.tar.gz" -C "$logs" . 2>/dev/null' EXIT
stage_timeout=${STAGE_TIMEOUT:-540}
stages=("$@")
[[ ${#stages[@]} -eq 0 ]] && stages=(build cuda-tests memcheck all-tests scoring sparse)

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv \
  | tee "$logs/gpu.txt" 2>&1 || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee -a "$logs/gpu.txt"

bench() {  # bench FILE [NAME K]: one benchmark file (narrowed by K and BENCH_K), its JSON among the logs as NAME
  local name=${2:-$1} k=${3:-}
  [[ -n ${BENCH_K:-} ]] && k="${k:+($k) and }($BENCH_K)"
  timeout "$stage_timeout" python -m pytest "benchmarks/test_$1.py" ${k:+-k "$k"} -p no:cacheprovider \
    --benchmark-group-by=group --benchmark-columns=median,iqr,rounds --benchmark-json "$logs/$name.json" 2>&1 \
    | tee "$logs/$name.log" | grep -v "^ *$" | tail -${BENCH_TAIL:-150}
}

imagenet() {  # imagenet NAME K: a part of test_gpu_imagenet.py, then its table of modes and ratios
  BENCH_TAIL=8 bench gpu_imagenet "$1" "$2"
  if [[ -s $logs/$1.json ]]; then python benchmarks/gpu_report.py "$logs/$1.json" | tee "$logs/$1.md"
  else echo "$1: no results (timed out before the first benchmark finished?)"; fi
}

for stage in "${stages[@]}"; do
  echo "=== $stage ($(date +%T))"
  case $stage in
    build)
      # The system compiler, whatever CC/CXX say: where they name another GCC (seen: /opt/gcc on a CUDA image),
      # it links its own C++ runtime into the extension beside the one torch loads, and the process crashes at
      # the first error message the extension formats. BUILD_CXX overrides.
      export CXX=${BUILD_CXX:-/usr/bin/g++} CC=${BUILD_CC:-/usr/bin/gcc}
      export LDSHARED="$CXX -shared" LDCXXSHARED="$CXX -shared"
      { env | grep -E "^(CC|CXX|[A-Z]*FLAGS)="; $CXX --version | head -1; nvcc --version | tail -1; } \
        | tee "$logs/toolchain.txt"
      MAX_JOBS=${MAX_JOBS:-16} python -m pip install -v --no-build-isolation -e . > "$logs/build.log" 2>&1 \
        || { tail -60 "$logs/build.log"; exit 1; }
      python -c "import graspext, graspext.version as v; print('built_with_cuda', v.built_with_cuda, v.cuda_arch_list)"
      # An error message with a number formatted inside the extension (a CPU op's check) must raise, not crash.
      python -c "import torch, graspext
try:
    torch.ops.graspext.global_kth_value([torch.randn(3)], 5)
except RuntimeError as e:
    print('error formatting works:', str(e).splitlines()[0])" || echo "error formatting CRASHED"
      nm -C graspext/_C.so | grep -c " [TtWw] std::" | sed 's/^/std:: definitions in _C.so: /'
      ;;
    cuda-tests)
      # In worker processes where pytest-xdist is installed, so that a crashing test is reported and the others
      # still run.
      workers=$(python -c "import xdist" 2>/dev/null && echo "-n 4")
      # shellcheck disable=SC2086
      timeout "$stage_timeout" python -m pytest tests -q -k cuda -p no:cacheprovider -rs $workers 2>&1 \
        | tee "$logs/tests_cuda.log" | tail -40
      ;;
    memcheck)
      # Many launches under memcheck are slow: a few hypothesis examples per test are enough to touch every
      # code path of every kernel.
      GRASPEXT_HYPOTHESIS_EXAMPLES=5 timeout "$stage_timeout" compute-sanitizer --tool memcheck \
        --error-exitcode 1 python -m pytest tests/ops -q -k "${MEMCHECK_K:-cuda}" -p no:cacheprovider \
        > "$logs/memcheck.log" 2>&1 \
        && echo "memcheck clean" || { echo "memcheck FAILED or timed out"; tail -30 "$logs/memcheck.log"; }
      ;;
    all-tests)
      timeout "$stage_timeout" python -m pytest tests -q -p no:cacheprovider 2>&1 | tee "$logs/tests_all.log" \
        | tail -15
      ;;
    backtrace)
      timeout "$stage_timeout" cuda-gdb -batch -ex run -ex bt -ex "info threads" --args python -m pytest -q \
        -p no:cacheprovider "$BACKTRACE_TEST" > "$logs/backtrace.log" 2>&1
      grep -v "^\[New Thread\|^\[Thread" "$logs/backtrace.log" | tail -60
      ;;
    profile)
      (cd benchmarks && timeout "$stage_timeout" python profile_grasp_cuda.py) > "$logs/profile.log" 2>&1
      grep "^#####" "$logs/profile.log"
      ;;
    profile-sparse)
      (cd benchmarks && timeout "$stage_timeout" python profile_sparse_cuda.py) > "$logs/profile_sparse.log" 2>&1
      grep -A8 "^#####" "$logs/profile_sparse.log" | cut -c1-180
      ;;
    distributed)
      gpus=$(python -c "import torch; print(torch.cuda.device_count())")
      if [[ $gpus -lt 2 ]]; then echo "distributed: $gpus GPU(s) visible, NCCL data parallelism needs 2 or more"
      else
        timeout "$stage_timeout" python -m torch.distributed.run --standalone --nproc-per-node "$gpus" \
          benchmarks/distributed_step.py --device cuda --batch 256 --json "$logs/distributed.json" 2>&1 \
          | tee "$logs/distributed.log" | grep -v Warning | tail -12
      fi
      ;;
    scoring) bench gpu_scoring ;;
    sparse) bench gpu_sparse ;;
    imagenet-masks)
      timeout "$stage_timeout" python benchmarks/imagenet_workloads.py --device cuda 2>&1 \
        | tee "$logs/imagenet_masks.log"
      ;;
    imagenet-layers) imagenet imagenet_layers_resnet50 "test_layer and resnet50" ;;
    imagenet-layers-vgg) imagenet imagenet_layers_vgg16 "test_layer and vgg16_bn" ;;
    imagenet-steps) imagenet imagenet_steps_resnet50 "test_step and resnet50" ;;
    imagenet-steps-vgg) imagenet imagenet_steps_vgg16 "test_step and vgg16_bn" ;;
    imagenet-targets)
      imagenet imagenet_targets "resnet50 and ((test_layer and target) or (test_step and eager and not 0.9-))" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
echo "=== done ($(date +%T))"
