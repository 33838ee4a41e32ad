"""``GistMemory`` (Lite mode): the model first writes a short gist of each chunk; the memory is the KV of the
joined gists.

Reading costs one generation per chunk, but the memory then holds only the gists, so far larger corpora fit in
the model's window than with raw KV. The gists themselves are kept (``gists``) and saved with the memory. With
``ratio > 1`` the gist KV is compressed further by the inherited selection.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, ClassVar

from memorag_core.memory.base import check_text
from memorag_core.memory.compressed_kv import CompressedKVMemory
from memorag_core.memory.config import MemoryStats
from memorag_core.prompts import get_prompts

if TYPE_CHECKING:
    from memorag_core.store.memory_file import MemoryTensors

logger = logging.getLogger(__name__)


class GistMemory(CompressedKVMemory):
    """Memory over LLM-written gists of ``gist_chunk_tokens``-token chunks."""

    kind: ClassVar[str] = "gist"

    def _reset_state(self) -> None:
        super()._reset_state()
        self.gists: list[str] = []

    def write_gists(self, text: str) -> list[str]:
        """One gist per chunk of ``text`` (chunks of at most ``gist_chunk_tokens`` tokens, whole words)."""
        from memorag_core.generators.hf import HFGenerator
        from memorag_core.retrieval.chunker import TokenChunker

        prompts = self.prompts or get_prompts(self.config.language, text)
        chunks = TokenChunker(self.tokenizer, chunk_size=self.config.gist_chunk_tokens).split(text)
        gen = HFGenerator.from_model(self.model, self.tokenizer)
        gists = gen.generate([prompts.gist.format(context=c.text) for c in chunks],
                             max_new_tokens=self.config.gist_max_new_tokens, repetition_penalty=1.2)
        logger.info("wrote %d gists for %d chunks", len(gists), len(chunks))
        return [g.strip() for g in gists]

    def append(self, text: str | bytes) -> MemoryStats:
        """Gist ``text`` chunk by chunk, then read the gists into the KV memory (raw tokens count the source)."""
        text = check_text(text)
        if self.is_empty:
            self.prompts = get_prompts(self.config.language, text)
        gists = self.write_gists(text)
        source_tokens = len(self._encode(text))
        before = self.stats.raw_tokens
        stats = super().append("\n".join(gists) + "\n")
        self.gists.extend(gists)
        # raw_tokens reports the source text read, not the gist tokens
        self.stats.raw_tokens = before + source_tokens
        return stats

    def header(self) -> dict:
        h = super().header()
        h["gists"] = list(self.gists)
        return h

    def import_tensors(self, m: "MemoryTensors") -> None:
        super().import_tensors(m)
        self.gists = list(m.header.get("gists", []))
