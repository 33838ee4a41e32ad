#!/usr/bin/env bash
# The main job on the embedded default models (SmolLM2-135M-Instruct memory + generator, all-MiniLM-L6-v2
# embedder), offline: the Ray Data memorize job publishes an excerpt of ../shared/data/harry_potter.txt (four
# documents) as collection "demo" into a local store, on a local Ray it starts itself; then the query engine
# answers a question over the published collection.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
BOOK=${BOOK:-../shared/data/harry_potter.txt}
CHARS=${CHARS:-20000}   # ~5.6K tokens: a few minutes to memorize on a 2-core CPU
OUT=${OUT:-runs/demo}
mkdir -p "$OUT"
python - "$BOOK" "$CHARS" "$OUT/corpus.jsonl" <<'EOF'
import json, sys
text = open(sys.argv[1], encoding="utf-8").read()[: int(sys.argv[2])]
parts = 4
step = -(-len(text) // parts)
with open(sys.argv[3], "w", encoding="utf-8") as f:
    for i in range(parts):
        piece = text[i * step:(i + 1) * step].strip()
        if piece:
            f.write(json.dumps({"doc_id": f"excerpt-{i + 1}", "text": piece}) + "\n")
EOF
memorag memorize --corpus "$OUT/corpus.jsonl" --collection demo --store "$OUT/store" --ratio 4 --num-cpus 2
memorag collections --store "$OUT/store"
memorag ask "Why does Dobby warn Harry not to go back to Hogwarts?" --collection demo --store "$OUT/store" \
    --max-new-tokens 64
