#!/usr/bin/env bash
# Create .venv with the project (editable: Ray workers import it) and its test extras.
# Torch comes from the package index: bring your own CUDA build by installing it first.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
.venv/bin/python -c "import torch, torchvision, ray, mlflow, dvc, torch_fidelity; print('setup ok: torch', torch.__version__, '| ray', ray.__version__, '| mlflow', mlflow.__version__)"
