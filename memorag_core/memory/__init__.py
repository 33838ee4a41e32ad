"""Memory kinds behind one base class.

=================  ==========================================================================================
kind               class
=================  ==========================================================================================
``compressed_kv``  :class:`CompressedKVMemory` - training-free, any HF causal LM, keeps ceil(window/ratio)
``full_kv``        :class:`FullKVMemory` - ratio 1, the whole KV cache
``beacon``         :class:`BeaconMemory` - MemoRAG's released checkpoints through their own remote code
``gist``           :class:`GistMemory` - Lite mode, KV of LLM-written gists
=================  ==========================================================================================
"""

from __future__ import annotations

from typing import Any

from memorag_core.memory.base import Memory, check_text
from memorag_core.memory.beacon import BeaconMemory
from memorag_core.memory.compressed_kv import CompressedKVMemory
from memorag_core.memory.config import MemoryConfig, MemoryStats
from memorag_core.memory.full_kv import FullKVMemory
from memorag_core.memory.gist import GistMemory

MEMORY_KINDS: dict[str, type[Memory]] = {
    cls.kind: cls for cls in (CompressedKVMemory, FullKVMemory, BeaconMemory, GistMemory)
}


def build_memory(config: MemoryConfig | None = None, model: Any = None, tokenizer: Any = None) -> Memory:
    """Make the memory that ``config.kind`` names (default: compressed KV on the embedded model).

    ``model``/``tokenizer`` reuse an already loaded model (e.g. one shared with the generator); otherwise the
    memory loads ``config.model``.
    """
    config = config or MemoryConfig()
    return MEMORY_KINDS[config.kind](config, model=model, tokenizer=tokenizer)


__all__ = ["Memory", "MemoryConfig", "MemoryStats", "CompressedKVMemory", "FullKVMemory", "BeaconMemory",
           "GistMemory", "MEMORY_KINDS", "build_memory", "check_text"]
