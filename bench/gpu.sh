#!/usr/bin/env bash
# The same comparison on a GPU machine: CUDA execution provider, fp16 (CUDA GroupQueryAttention
# has no fp32 kernel). Needs onnxruntime-gpu instead of onnxruntime:
#
#   python -m venv .venv && . .venv/bin/activate && pip install -e ".[gpu]"
#   bench/gpu.sh                      # E2B size: bench/results/results_cuda_fp16.json (+ .md)
#   bench/gpu.sh --quick              # tiny model, seconds: is the set-up right?
#
# Besides the latencies it records, per model, the nodes ORT placed on each execution
# provider and the Memcpy nodes it inserted (from ORT profiling: "Nodes by execution
# provider" in the .md), and the device memory of a decode step (nvidia-smi).
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/results/results_cuda_fp16.json
for arg in "$@"; do [[ "$arg" == --quick ]] && out=bench/results/results_cuda_fp16_quick.json; done
python -c 'import onnxruntime as ort, sys; sys.exit("CUDAExecutionProvider" not in ort.get_available_providers() and "onnxruntime has no CUDAExecutionProvider: pip install onnxruntime-gpu")'
exec python bench/run.py --provider cuda --dtype float16 --json "$out" "$@"
