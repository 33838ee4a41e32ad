"""TokenChunker: token bound, exact offsets, no split words, boundary preference, CJK, overlap, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from memorag_core.errors import InvalidInputError
from memorag_core.retrieval import TokenChunker

DATA = Path(__file__).resolve().parents[4] / "shared" / "data"


def _book(name: str, chars: int) -> str:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"{path} is not present")
    return path.read_text(encoding="utf-8")[:chars]


def _check_layout(text: str, chunks) -> None:
    """Offsets address the text, chunks are in order, and only whitespace lies between them (overlap 0)."""
    assert chunks, "no chunks"
    prev_end = 0
    for i, c in enumerate(chunks):
        assert c.index == i
        assert text[c.start:c.end] == c.text
        assert c.text == c.text.strip() and c.text
        assert c.start >= prev_end
        assert text[prev_end:c.start].strip() == "", "non-whitespace text was dropped between chunks"
        prev_end = c.end
    assert text[prev_end:].strip() == ""


@pytest.mark.parametrize("tok_fixture", ["smol_tokenizer", "minilm_tokenizer"])
@pytest.mark.parametrize("size", [64, 200])
def test_english_bound_offsets_and_whole_words(request, tok_fixture, size):
    text = _book("harry_potter.txt", 30_000)
    chunker = TokenChunker(request.getfixturevalue(tok_fixture), chunk_size=size)
    chunks = chunker.split(text)
    _check_layout(text, chunks)
    counts = [chunker.count_tokens(c.text) for c in chunks]
    assert max(counts) <= size
    assert sum(counts) / len(counts) > 0.5 * size, "chunks are far from full"
    # No word is cut: the chunks' whitespace-separated words are exactly the text's words.
    assert [w for c in chunks for w in c.text.split()] == text.split()
    for c in chunks:  # every cut sits at whitespace
        assert c.start == 0 or text[c.start - 1].isspace()
        assert c.end == len(text) or text[c.end].isspace()


def test_default_is_512_tokens_of_smollm2():
    chunker = TokenChunker()
    assert chunker.chunk_size == 512
    text = _book("harry_potter.txt", 20_000)
    chunks = chunker.split(text)
    assert max(chunker.count_tokens(c.text) for c in chunks) <= 512
    assert len(chunks) >= 8


def test_prefers_paragraph_then_sentence_boundaries(smol_tokenizer):
    chunker = TokenChunker(smol_tokenizer, chunk_size=120)
    para = "The river rose slowly through the night and the village watched it. " * 4  # ~56 tokens
    text = "\n\n".join(para.strip() for _ in range(6))
    chunks = chunker.split(text)
    _check_layout(text, chunks)
    # Two paragraphs fit in 120 tokens: every cut is at a paragraph break.
    for c in chunks[:-1]:
        assert text[c.end:c.end + 2] == "\n\n"
    # Without paragraphs, cuts fall after sentences.
    flat = " ".join(para.strip() for _ in range(6))
    chunks = chunker.split(flat)
    _check_layout(flat, chunks)
    assert all(c.text.endswith(".") for c in chunks)


def test_long_word_is_cut_on_token_boundaries(smol_tokenizer):
    chunker = TokenChunker(smol_tokenizer, chunk_size=16)
    word = "supercalifragilistic" * 20
    text = f"start {word} end"
    chunks = chunker.split(text)
    _check_layout(text, chunks)
    assert all(chunker.count_tokens(c.text) <= 16 for c in chunks)
    assert len(chunks) > 3
    assert chunks[0].text == "start", "the long word must not be glued to the preceding normal word"
    # The cuts inside the word fall on token boundaries of the whole text's tokenization.
    ends = {e for _, e in smol_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]}
    inner = [c.end for c in chunks[1:-1]]
    assert inner and all(e in ends for e in inner)


def test_chinese_cuts_at_punctuation(smol_tokenizer):
    text = _book("fortress_besieged.txt", 20_000)
    assert sum(ch.isspace() for ch in text) < len(text) / 20  # really (almost) no spaces
    chunker = TokenChunker(smol_tokenizer, chunk_size=128)
    chunks = chunker.split(text)
    _check_layout(text, chunks)
    assert max(chunker.count_tokens(c.text) for c in chunks) <= 128
    ends = [c.text[-1] for c in chunks[:-1]]
    # Sentences in this novel often run past half of 128 tokens: then a clause mark is the preferred cut.
    sentence_end = sum(e in "。！？”…」" for e in ends)
    punctuation_end = sum(e in "。！？”…」，、；：" for e in ends)
    assert sentence_end / len(ends) > 0.7, ends
    assert punctuation_end / len(ends) > 0.95, ends


def test_overlap(smol_tokenizer):
    text = _book("harry_potter.txt", 10_000)
    chunker = TokenChunker(smol_tokenizer, chunk_size=100, overlap=20)
    chunks = chunker.split(text)
    for a, b in zip(chunks, chunks[1:]):
        assert b.start < a.end, "consecutive chunks must overlap"
        assert b.start > a.start
        assert chunker.count_tokens(text[b.start:a.end]) <= 20 + 2
        assert text[b.start - 1].isspace()
    assert max(chunker.count_tokens(c.text) for c in chunks) <= 100
    assert chunks[-1].end == len(text.rstrip())


def test_empty_and_bad_input(smol_tokenizer):
    chunker = TokenChunker(smol_tokenizer, chunk_size=32)
    assert chunker.split("") == []
    assert chunker.split(" \n\t ") == []
    with pytest.raises(InvalidInputError, match="str"):
        chunker.split(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="str"):
        chunker.count_tokens(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="chunk_size"):
        TokenChunker(smol_tokenizer, chunk_size=0)
    with pytest.raises(InvalidInputError, match="overlap"):
        TokenChunker(smol_tokenizer, chunk_size=32, overlap=32)


def test_slow_tokenizer_rejected():
    class Slow:
        is_fast = False

    with pytest.raises(InvalidInputError, match="fast tokenizer"):
        TokenChunker(Slow(), chunk_size=32)


def test_single_short_text(smol_tokenizer):
    chunks = TokenChunker(smol_tokenizer, chunk_size=32).split("  Hello there, world.  ")
    assert [(c.text, c.start, c.end) for c in chunks] == [("Hello there, world.", 2, 21)]


def test_tiny_size_on_multi_token_characters_terminates(smol_tokenizer):
    # Each of these CJK characters is 2-3 byte-level tokens: with chunk_size=1 none fits, yet split must end,
    # keep every character whole and cover the text.
    text = "你好世界。"
    chunker = TokenChunker(smol_tokenizer, chunk_size=1)
    chunks = chunker.split(text)
    assert "".join(c.text for c in chunks) == text
    assert all(len(c.text) == 1 for c in chunks)
    chunks = TokenChunker(smol_tokenizer, chunk_size=3).split(text)
    _check_layout(text, chunks)
