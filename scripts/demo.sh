#!/usr/bin/env bash
# The main job on the embedded default models (SmolLM2-135M-Instruct memory + generator, all-MiniLM-L6-v2
# embedder), offline: memorize an excerpt of ../shared/data/harry_potter.txt into a bundle, then ask about it.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
BOOK=${BOOK:-../shared/data/harry_potter.txt}
CHARS=${CHARS:-20000}   # ~5.6K tokens: about a minute to memorize on a 2-core CPU
memorag memorize "$BOOK" --max-chars "$CHARS" --ratio 4 --save-dir runs/demo-bundle
memorag ask "Why does Dobby warn Harry not to go back to Hogwarts?" --from runs/demo-bundle --max-new-tokens 64
