"""memorag_core: the MemoRAG loop on one machine (memory, prompts, retrieval, generators, artifact store).

Imports no Ray and no vLLM; heavy libraries load where they are used. The upstream-compatible entry points::

    from memorag_core import MemoRAG, MemoRAGLite, Memory, Agent
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "MemoRAG": "memorag_core.facade",
    "MemoRAGLite": "memorag_core.facade",
    "Memory": "memorag_core.facade",
    "Clues": "memorag_core.facade",
    "Agent": "memorag_core.generators.openai_http",
    "MemoryConfig": "memorag_core.memory.config",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'memorag_core' has no attribute {name!r}")


__all__ = list(_LAZY)
