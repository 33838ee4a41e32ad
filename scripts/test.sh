#!/usr/bin/env bash
# The default test run (what CI runs): everything but tests marked slow.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pytest -m "not slow" -q "$@"
