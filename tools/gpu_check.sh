#!/usr/bin/env bash
# The GPU check: run it first whenever a device machine is lent. From the repository root,
# here: `mkdir -p .gpu-data && cp -r ../shared/data/mnist-t10k .gpu-data/` (ignored by git:
# the real test digits, which do not travel otherwise); then the device tool's run with
# command `bash tools/gpu_check.sh`, carry [".gpu-data"], timeout_s 540.
# It uses the machine's own python3 and torch (nothing can be installed there) with the
# repository on PYTHONPATH: the machine, then every CUDA test (tests/test_gpu.py, marked gpu,
# and the suite's CUDA tests) with the streams slowed on purpose, one mode again under
# TORCH_CUDA_SANITIZER=1, then the GPU benchmark rows (tools/gpu_bench.py). Exit status: 1
# if any test failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 FASTMNIST_REAL_DATA=$PWD/.gpu-data/mnist-t10k CI=true
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'cpu capability', torch.backends.cpu.get_cpu_capability())"
status=0
tests=(tests/test_gpu.py tests/test_loader.py::test_cuda_paths_equal_the_cpu_result
       tests/test_loader.py::test_cpu_batches_are_pinned_when_asked tests/test_augment.py::test_augmented_on_the_gpu_equals_the_cpu)
if $PY -c "import webdataset" 2> /dev/null; then
  tests+=(tests/test_wds.py::test_streamed_cuda_batches_equal_the_cpu_result)
else
  echo "gpu_check: webdataset is not installed here: the streamed CUDA test is left out"
fi
echo "== the CUDA tests"
$PY -m pytest -q -p no:cacheprovider "${tests[@]}" || status=1
echo "== once under TORCH_CUDA_SANITIZER=1"
TORCH_CUDA_SANITIZER=1 $PY -m pytest -q -p no:cacheprovider \
  "tests/test_gpu.py::test_every_cuda_mode_gives_the_cpu_bits_under_slowed_streams" -k "prefetch2_imagesuint8 and consumer" \
  || status=1
echo "== GPU benchmark rows"
set_dir=$(mktemp -d)
$PY -c "import sys; from fastmnist import convert; from fastmnist.conversion.synth import write_raw
write_raw(sys.argv[1] + '/raw'); convert(sys.argv[1] + '/raw', sys.argv[1] + '/set', progress=False)" "$set_dir" \
  && $PY tools/gpu_bench.py "$set_dir/set" || status=1
exit $status
