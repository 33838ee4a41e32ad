"""Small synthetic corpora for the memorize job tests (deterministic, a few dozen short documents)."""

from __future__ import annotations

import json
from pathlib import Path

_WORDS = ("river stone lantern harbor orchard meadow signal copper violet engine garden winter falcon "
          "marble thunder canyon ribbon silver forest candle").split()


def doc_text(i: int, words: int = 40) -> str:
    """A deterministic pseudo-text for document ``i``."""
    return " ".join(_WORDS[(i * 7 + k * 3 + k * k) % len(_WORDS)] for k in range(words)) + f". Document {i}."


def write_jsonl_corpus(path: Path, ids: list[int], *, bad: bool = True, long_doc: bool = True) -> Path:
    """A JSONL corpus with documents ``ids`` (plus, when ``bad``, rows that must be quarantined)."""
    lines = [json.dumps({"doc_id": f"doc-{i:03d}", "text": doc_text(i), "title": f"T{i}"}) for i in ids]
    if long_doc:
        lines.append(json.dumps({"doc_id": "long-000", "text": " ".join(doc_text(k) for k in range(12))}))
    if bad:
        lines += ['{"doc_id": "broken", "text": ', json.dumps({"doc_id": "blank", "text": "   "}),
                  json.dumps({"doc_id": "nul", "text": "a\u0000b"})]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
