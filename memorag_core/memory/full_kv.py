"""``FullKVMemory``: the whole KV cache of the text (ratio 1), for long-context models.

Nothing is scored or dropped, so generating after it equals generating with the whole text in the prompt
(tested). It is the compressed memory's special case with every entry kept.
"""

from __future__ import annotations

from typing import ClassVar

from memorag_core.memory.compressed_kv import CompressedKVMemory


class FullKVMemory(CompressedKVMemory):
    """Keeps every KV entry: ``ratio`` is 1 by definition (the config rejects anything else)."""

    kind: ClassVar[str] = "full_kv"
