#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU (after bash scripts/setup.sh):
#   1. the `gpu` tests (bf16/TF32/channels_last training on CUDA, TorchTrainer with use_gpu over NCCL);
#   2. training samples/s of a GPU-sized network: TorchTrainer against the bare loop on the
#      same GPU, and bf16 against fp32 (bench/gpu_train.py; ratios from the same run).
# Put the figures it prints in BENCHMARKS.md ("GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
$PY -m pytest -m gpu -v -rs -p no:cacheprovider tests/gpu
$PY bench/gpu_train.py --steps "${STEPS:-200}" --batch "${BATCH:-128}"
