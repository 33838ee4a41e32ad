"""Token-bounded chunking of a text into retrieval passages.

A chunk holds at most ``chunk_size`` tokens of the chosen tokenizer (default: the embedded SmolLM2 tokenizer,
512 tokens, as upstream MemoRAG) and is never cut inside a word. Cut points are ranked, and a chunk ends at the
strongest boundary that still leaves it reasonably full (at least ``min_fill`` of the budget):

==========  =====================================================================================
level 5     paragraph break (a blank line)
level 4     line break
level 3     sentence end (``. ! ?`` followed by whitespace; ``。！？…`` in CJK text, closing quotes included)
level 2     clause punctuation (``, ; :`` followed by whitespace; ``，、；：`` in CJK text)
level 1     any other word boundary (whitespace; between two CJK characters, which have no spaces)
==========  =====================================================================================

A single word longer than ``chunk_size`` tokens is the only thing cut inside a word, and then on token boundaries.
(A single character that alone takes more than ``chunk_size`` tokens, possible only for tiny sizes, stays whole and
is logged.)

Offsets are character offsets into the source text: ``text[chunk.start:chunk.end] == chunk.text``. Leading and
trailing whitespace is trimmed from each chunk, so with ``overlap=0`` the gaps between consecutive chunks hold
whitespace only and the chunks plus the gaps reassemble the source exactly.

Token counts are first estimated from one tokenization of the whole text (offset mapping), then each chunk is
re-tokenized on its own and shrunk if tokenizing it alone gives more than ``chunk_size`` tokens (BPE merges can
differ at the edges), so the bound holds for the chunk text as the embedder will see it (without special tokens).
"""

from __future__ import annotations

import bisect
import logging
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from memorag_core.errors import InvalidInputError

logger = logging.getLogger(__name__)

# CJK ideographs, kana, hangul, CJK punctuation and full-width forms: scripts written without spaces, where a
# boundary between any two characters is a legal cut.
_CJK = r"\u2e80-\u2fdf\u3000-\u303f\u3040-\u30ff\u3100-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
_CLOSERS = "\"'”’」』）)】》\\]"
# (level, pattern); the cut goes at the end of each match.
_BOUNDARY_PATTERNS: list[tuple[int, re.Pattern[str]]] = [
    (5, re.compile(r"\n[ \t\r\f\v]*\n\s*")),
    (4, re.compile(r"\n\s*")),
    (3, re.compile(rf"[.!?][{_CLOSERS}]*\s+")),
    (3, re.compile(rf"[。！？!?…]+[{_CLOSERS}]*")),
    (2, re.compile(rf"[,;:][{_CLOSERS}]*\s+")),
    (2, re.compile(rf"[，、；：,;:][{_CLOSERS}]*(?=[{_CJK}])")),
    (1, re.compile(r"\s+")),
]
_CJK_CHAR = re.compile(rf"[{_CJK}]")


@dataclass(frozen=True)
class Chunk:
    """One retrieval passage.

    Attributes:
        text: the passage, ``source[start:end]`` (leading/trailing whitespace trimmed).
        start: character offset of the first character in the source text.
        end: character offset one past the last character.
        index: position of the chunk in the split (0, 1, ...).
    """

    text: str
    start: int
    end: int
    index: int


class TokenChunker:
    """Split text into chunks of at most ``chunk_size`` tokens, cutting at the strongest natural boundary.

    Args:
        tokenizer: a fast Hugging Face tokenizer (one that returns offset mappings), or ``None`` for the embedded
            SmolLM2 tokenizer (``memorag_core.models.load_tokenizer(None)``).
        chunk_size: maximum tokens per chunk (counted without special tokens), > 0. Default 512.
        overlap: tokens that a chunk repeats from the end of the previous one (approximate, rounded down to a
            word boundary), ``0 <= overlap < chunk_size``.
        min_fill: a boundary of a higher level is preferred only if the chunk it ends holds at least this
            fraction of ``chunk_size`` tokens, so that e.g. an early paragraph break does not produce tiny chunks.

    Raises:
        InvalidInputError: a bad ``chunk_size``/``overlap``/``min_fill``, or a tokenizer without offset mappings.
    """

    def __init__(self, tokenizer: Any = None, chunk_size: int = 512, overlap: int = 0, min_fill: float = 0.5):
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
            raise InvalidInputError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if not isinstance(overlap, int) or isinstance(overlap, bool) or not 0 <= overlap < chunk_size:
            raise InvalidInputError(f"overlap must be an int in [0, chunk_size={chunk_size}), got {overlap!r}")
        if not 0.0 <= float(min_fill) <= 1.0:
            raise InvalidInputError(f"min_fill must be in [0, 1], got {min_fill!r}")
        if tokenizer is None:
            from memorag_core.models import load_tokenizer

            tokenizer = load_tokenizer(None)
        if not getattr(tokenizer, "is_fast", False):
            raise InvalidInputError(
                f"TokenChunker needs a fast tokenizer with offset mappings; got {type(tokenizer).__name__}"
            )
        self.tokenizer = tokenizer
        self.chunk_size = chunk_size
        self.overlap = overlap
        self.min_fill = float(min_fill)

    # -- tokens -------------------------------------------------------------------------------------------------
    def _encode(self, text: str, offsets: bool = False) -> Any:
        return self.tokenizer(
            text, add_special_tokens=False, return_offsets_mapping=offsets, truncation=False, verbose=False
        )

    def count_tokens(self, text: str) -> int:
        """Number of tokens in ``text`` without special tokens. Raises InvalidInputError for a non-string."""
        if not isinstance(text, str):
            raise InvalidInputError(f"text must be a str, got {type(text).__name__}")
        return len(self._encode(text)["input_ids"])

    # -- boundaries ---------------------------------------------------------------------------------------------
    @staticmethod
    def _boundaries(text: str) -> tuple[np.ndarray, np.ndarray]:
        """Legal cut positions and their levels, sorted by position: ``(m,)`` int64 positions, ``(m,)`` int8."""
        levels: dict[int, int] = {}
        for level, pattern in _BOUNDARY_PATTERNS:
            for m in pattern.finditer(text):
                for pos in (m.start(), m.end()) if level == 1 else (m.end(),):
                    if levels.get(pos, 0) < level:
                        levels[pos] = level
        for m in _CJK_CHAR.finditer(text):  # no spaces in CJK: either side of a CJK character is a word boundary
            for pos in (m.start(), m.end()):
                levels.setdefault(pos, 1)
        levels[len(text)] = 6
        levels.pop(0, None)
        pos = np.array(sorted(levels), dtype=np.int64)  # (m,)
        lvl = np.array([levels[p] for p in pos.tolist()], dtype=np.int8)  # (m,)
        return pos, lvl

    # -- split --------------------------------------------------------------------------------------------------
    def split(self, text: str) -> list[Chunk]:
        """Split ``text`` into chunks; see the module docstring for the rules.

        Returns:
            chunks in source order; ``[]`` for an empty or whitespace-only text.

        Raises:
            InvalidInputError: ``text`` is not a str.
        """
        if not isinstance(text, str):
            raise InvalidInputError(f"text must be a str, got {type(text).__name__}")
        if not text.strip():
            return []
        enc = self._encode(text, offsets=True)
        offs = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)  # (tokens, 2) char spans
        tok_start, tok_end = offs[:, 0], np.maximum.accumulate(offs[:, 1])  # (tokens,), (tokens,) non-decreasing
        bpos, blvl = self._boundaries(text)
        n = len(text)

        def tokens_between(a: int, b: int) -> int:
            """Upper-ish estimate of tokens covering text[a:b] from the global tokenization."""
            first = int(np.searchsorted(tok_end, a, side="right"))  # first token ending after a
            last = int(np.searchsorted(tok_start, b, side="left"))  # tokens starting before b
            return max(0, last - first)

        chunks: list[Chunk] = []
        start = self._skip_space(text, 0)
        while start < n:
            end = self._choose_end(text, start, bpos, blvl, tok_start, tok_end, tokens_between)
            # The global token estimate can be off at the edges: verify on the chunk alone and shrink if needed.
            s, e = self._trim(text, start, end)
            while self.count_tokens(text[s:e]) > self.chunk_size:
                shorter = self._shrink(start, end, bpos, tok_end)
                if shorter >= end:
                    # One character that alone is more than chunk_size tokens (byte-level BPE can need 3-4
                    # tokens per CJK character or emoji): it cannot be cut, so it forms an over-long chunk.
                    logger.warning("the character at %d is %d tokens, more than chunk_size=%d: kept whole",
                                   s, self.count_tokens(text[s:e]), self.chunk_size)
                    break
                end = shorter
                s, e = self._trim(text, start, end)
            if e > s:
                chunks.append(Chunk(text=text[s:e], start=s, end=e, index=len(chunks)))
            if end >= n:
                break
            nxt = end
            if self.overlap:
                nxt = self._overlap_start(start, end, bpos, tokens_between)
            start = self._skip_space(text, nxt)
        logger.debug("split %d chars into %d chunks of <= %d tokens", n, len(chunks), self.chunk_size)
        return chunks

    @staticmethod
    def _skip_space(text: str, pos: int) -> int:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        return pos

    @staticmethod
    def _trim(text: str, start: int, end: int) -> tuple[int, int]:
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        return start, end

    def _choose_end(self, text, start, bpos, blvl, tok_start, tok_end, tokens_between) -> int:
        """The cut position for a chunk starting at ``start``."""
        n = len(text)
        first = int(np.searchsorted(tok_end, start, side="right"))  # first token ending after start
        if first + self.chunk_size >= len(tok_end):
            limit = n
        else:
            # The end of the last token that fits; the next token must not start before the cut.
            limit = int(tok_start[first + self.chunk_size])
            limit = max(limit, start + 1)
        lo = bisect.bisect_right(bpos, start)
        hi = bisect.bisect_right(bpos, limit)
        if hi <= lo:
            # No word boundary within the budget: one word longer than chunk_size; cut on a token boundary.
            logger.debug("a word at char %d is longer than %d tokens: cutting it on token boundaries",
                         start, self.chunk_size)
            return limit if limit < n else n
        cand_pos, cand_lvl = bpos[lo:hi], blvl[lo:hi]  # (c,), (c,)
        if cand_pos[-1] == n:
            return n
        min_tokens = self.min_fill * self.chunk_size
        for level in range(5, 0, -1):
            idx = np.nonzero(cand_lvl >= level)[0]
            if idx.size == 0:
                continue
            pos = int(cand_pos[idx[-1]])
            if level == 1 or tokens_between(start, pos) >= min_tokens:
                return pos
        return int(cand_pos[-1])

    def _shrink(self, start: int, end: int, bpos: np.ndarray, tok_end: np.ndarray) -> int:
        """A cut strictly before ``end``: the previous word boundary, else the previous token end."""
        i = bisect.bisect_left(bpos, end) - 1
        if i >= 0 and bpos[i] > start:
            return int(bpos[i])
        j = int(np.searchsorted(tok_end, end, side="left")) - 1
        while j >= 0 and tok_end[j] >= end:
            j -= 1
        if j >= 0 and tok_end[j] > start:
            return int(tok_end[j])
        return end - 1 if end - 1 > start else end  # pathological tokenizer: fall back to characters

    def _overlap_start(self, start, end, bpos, tokens_between) -> int:
        """The earliest word boundary after ``start`` such that at most ``overlap`` tokens lie before ``end``."""
        lo = bisect.bisect_right(bpos, start)
        hi = bisect.bisect_left(bpos, end)
        for i in range(lo, hi):
            if tokens_between(int(bpos[i]), end) <= self.overlap:
                return int(bpos[i])
        return end
