"""The MemoRAG facade: upstream-compatible calls, bundles on disk and on S3, bad input, and one end-to-end run
with the embedded real models on a HotpotQA item."""

from __future__ import annotations

import json

import pytest

from memorag_core.errors import ArtifactNotFoundError, CorruptArtifactError, InvalidInputError, MemoryNotReadyError
from memorag_core.facade import MemoRAG, MemoRAGLite, dedupe_queries, split_clue_lines
from memorag_core.memory import MemoryConfig


@pytest.fixture(scope="module")
def book(shared_data_dir):
    return (shared_data_dir / "harry_potter.txt").read_text(encoding="utf-8")[:4000]


@pytest.fixture(scope="module")
def pipe(tiny_lm_dir):
    return MemoRAG(memory_config=MemoryConfig(model=str(tiny_lm_dir), ratio=4, window=256),
                   retrieval_chunk_size=128, clue_max_new_tokens=8)


def test_split_clue_lines_keeps_informative_lines():
    text = "1. Harry lives with the Dursleys\n- short\n* The owl brings a letter to Harry\n\n2) ok"
    assert split_clue_lines(text, "en") == ["Harry lives with the Dursleys", "The owl brings a letter to Harry"]
    assert split_clue_lines("1. 哈利住在女贞路\n2. 是", "zh") == ["哈利住在女贞路"]


def test_dedupe_queries_drops_near_repeats():
    qs = ["Dad, I'm sure you're right.", "Dad, I'm sure you're right", "DAD i'm sure you're right!", "Why?", "?"]
    assert dedupe_queries(qs) == ["Dad, I'm sure you're right.", "Why?"]


def test_memorize_save_load_round_trip(pipe, tiny_lm_dir, book, tmp_path):
    report = pipe.memorize(book, save_dir=str(tmp_path / "bundle"))
    assert report.chunks == len(pipe.retriever.corpus) >= 3
    assert report.manifest["files"]["memory.safetensors"]["nbytes"] > 0
    q = "Who lives at number four, Privet Drive?"
    want = pipe(query=q, max_new_tokens=8)
    clues = pipe.clues(q)
    assert clues.retrieval_queries[0] == q  # the question first, then the clues that survived
    assert pipe.retrieve(clues.retrieval_queries)  # at least the question's own hits

    other = MemoRAG(memory_config=MemoryConfig(model=str(tiny_lm_dir), ratio=4, window=256),
                    retrieval_chunk_size=128, clue_max_new_tokens=8)
    manifest = other.load(str(tmp_path / "bundle"))
    assert manifest["memory"]["stats"]["raw_tokens"] == pipe.memory.stats.raw_tokens
    assert other.retriever.corpus == pipe.retriever.corpus
    assert other(query=q, max_new_tokens=8) == want
    assert other(query=q, task_type="qa", max_new_tokens=6) == pipe(query=q, task_type="qa", max_new_tokens=6)
    assert isinstance(other(task_type="summarize", max_new_tokens=6), str)


def test_bundle_on_s3(pipe, tiny_lm_dir, book, moto_s3, capsys):
    bucket = moto_s3.make_bucket()
    url = f"s3://{bucket}/bundles/hp"
    pipe.memorize(book, save_dir=url, print_stats=True, storage_options=moto_s3.storage_options())
    printed = capsys.readouterr().out
    assert "memory.safetensors" in printed and "MiB" in printed  # sizes read from the manifest
    other = MemoRAG(memory_config=MemoryConfig(model=str(tiny_lm_dir), ratio=4, window=256),
                    retrieval_chunk_size=128, clue_max_new_tokens=8)
    other.load(url, storage_options=moto_s3.storage_options())
    q = "What is Harry's uncle's name?"
    assert other(query=q, task_type="qa", max_new_tokens=6) == pipe(query=q, task_type="qa", max_new_tokens=6)


def test_bad_inputs_name_the_cause(pipe, tiny_lm_dir, book, tmp_path):
    fresh = MemoRAG(memory_config=MemoryConfig(model=str(tiny_lm_dir), ratio=4), retrieval_chunk_size=128)
    with pytest.raises(MemoryNotReadyError):
        fresh(query="anything")
    with pytest.raises(InvalidInputError, match="task_type"):
        fresh(query="q", context=book, task_type="translate")
    with pytest.raises(InvalidInputError, match="empty"):
        fresh.memorize("")
    with pytest.raises(ArtifactNotFoundError):
        fresh.load(str(tmp_path / "no-such-bundle"))
    with pytest.raises(Exception, match="does not exist"):
        MemoRAG(mem_model_name_or_path=str(tmp_path / "missing-model"))
    with pytest.raises(InvalidInputError, match="ratio"):
        MemoRAG(mem_model_name_or_path=str(tiny_lm_dir), beacon_ratio=0)

    # a corrupt memory file inside a bundle: the checksum catches it, and nothing loaded is half-replaced
    pipe.memorize(book, save_dir=str(tmp_path / "b"))
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    mem_file = tmp_path / "b" / manifest["files"]["memory.safetensors"]["path"]
    data = bytearray(mem_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    mem_file.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match="memory.safetensors"):
        fresh.load(str(tmp_path / "b"))
    assert not fresh.is_ready


@pytest.mark.slow  # ~1 min; the facade's calls are tested one by one above
def test_upstream_readme_code_runs_with_names_changed(tiny_lm_dir, book, tmp_path, monkeypatch):
    """The upstream README's snippets, with the import line and model names changed (tiny models for speed)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "harry_potter.txt").write_text(book, encoding="utf-8")
    from memorag_core import MemoRAG as UpstreamStyle  # "from memorag import MemoRAG"

    pipe = UpstreamStyle(mem_model_name_or_path=str(tiny_lm_dir), ret_model_name_or_path=None,
                         cache_dir="path_to_model_cache", beacon_ratio=4)
    test_txt = open("harry_potter.txt").read()
    pipe.memorize(test_txt, save_dir="cache/harry_potter/", print_stats=True)
    query = "How many times is the Chamber of Secrets opened in the book?"
    res = pipe(context=test_txt, query=query, task_type="memorag", max_new_tokens=8)
    assert isinstance(res, str)
    res = pipe(context=test_txt, task_type="summarize", max_new_tokens=8)
    assert isinstance(res, str)

    from memorag_core import Memory  # upstream's Memory(...) class

    memo_model = Memory(str(tiny_lm_dir), cache_dir="path_to_model_cache", beacon_ratio=4)
    memo_model.memorize(test_txt)
    memo_model.save("cache/harry_potter/memory.bin")
    assert isinstance(memo_model.recall(query, max_new_tokens=4), str)
    assert isinstance(memo_model.rewrite(query, max_new_tokens=4), str)
    assert isinstance(memo_model.summarize(max_new_tokens=4), str)
    memo_model.load("cache/harry_potter/memory.bin")
    assert isinstance(memo_model.answer(query, max_new_tokens=4), str)
    # upstream's default beacon_ratio does not clash with a full KV memory: it keeps everything
    assert Memory(str(tiny_lm_dir), beacon_ratio=4, kind="full_kv").config.ratio == 1

    lite = MemoRAGLite(gen_model_name_or_path=str(tiny_lm_dir), gist_chunk_tokens=400)
    lite.memory.config.gist_max_new_tokens = 8
    lite.memorize(test_txt[:1500], save_dir="harry_potter_lite", print_stats=True)
    assert isinstance(lite(query, max_new_tokens=6), str)


@pytest.fixture(scope="module")
def hotpot_item(shared_data_dir):
    with open(shared_data_dir / "hotpotqa_dev_300.jsonl", encoding="utf-8") as f:
        return json.loads(next(f))


@pytest.mark.slow  # ~4 min on 2 cores; the embedded models answer end to end in the Serve and CLI tests too
def test_end_to_end_with_the_embedded_models_on_hotpotqa(hotpot_item):
    """Real SmolLM2-135M memory + generator and all-MiniLM-L6-v2 retriever on one HotpotQA question.

    SmolLM2-135M is weak, so the answer is a smoke signal; retrieval must surface a gold supporting paragraph.
    """
    ctx = hotpot_item["context"]
    paragraphs = [f"{t}: {''.join(s)}" for t, s in zip(ctx["title"], ctx["sentences"])]
    pipe = MemoRAG(ret_hit=2, clue_max_new_tokens=32)  # everything embedded
    pipe.memory.config.window = 512
    pipe.memory.memorize("\n\n".join(paragraphs))
    # a paragraph longer than the embedder's 254 tokens is split (the embedder refuses to cut it silently)
    pipe.index_corpus([c.text for p in paragraphs for c in pipe.chunker.split(p)])
    q = hotpot_item["question"]
    clues = pipe.clues(q)
    hits = pipe.retrieve(clues.retrieval_queries)
    fused = pipe.evidence(q, clues)  # the fused top ret_hit: the question's best hit is always among them
    assert len(fused) == 2
    assert pipe.evidence(q, None, hits=1)[0].chunk_id in {h.chunk_id for h in fused}
    gold = set(hotpot_item["supporting_facts"]["title"])
    assert any(h.text.split(":", 1)[0] in gold for h in hits), [h.text[:40] for h in hits]
    answer = pipe.answer_from_evidence(q, [h.text for h in hits], max_new_tokens=24)
    assert isinstance(answer, str) and answer.strip()


def test_chunks_fit_the_embedder_and_a_bundle_refuses_another_embedder(tiny_lm_dir, book, tmp_path):
    from memorag_core.retrieval import max_chunk_tokens

    pipe = MemoRAG(memory_config=MemoryConfig(model=str(tiny_lm_dir), ratio=4, window=256), clue_max_new_tokens=4)
    limit = max_chunk_tokens(pipe.embedder)
    assert pipe.retrieval_chunk_size == limit == 254  # all-MiniLM-L6-v2 embeds 256 tokens with [CLS] and [SEP]
    with pytest.raises(InvalidInputError, match="exceeds what the embedder"):
        MemoRAG(memory_config=MemoryConfig(model=str(tiny_lm_dir), ratio=4), retrieval_chunk_size=512)
    pipe.memorize(book[:4000], save_dir=str(tmp_path / "b"))
    assert all(len(pipe.embedder.tokenizer(c, add_special_tokens=False)["input_ids"]) <= limit
               for c in pipe.retriever.corpus)
    starts = pipe._chunk_starts  # first memory token of each chunk (after any leading whitespace token)
    assert len(starts) == len(pipe.retriever.corpus) and starts[0] <= 1 and starts == sorted(set(starts))
    assert pipe.pointers("Who lives on Privet Drive?")  # the memory keeps source offsets: pointers work
    other = MemoRAG(memory_config=MemoryConfig(model=str(tiny_lm_dir), ratio=4, window=256))
    other.embedder.name = "some/other-embedder"
    with pytest.raises(InvalidInputError, match="some/other-embedder"):
        other.load(str(tmp_path / "b"))


def test_the_facade_runs_the_query_composition_over_its_bundle(pipe, book):
    """A bundle is a one-unit collection: __call__/stream run the engine's composition (exactly ret_hit passages
    reach the generator, the draft is a query, qa is plain RAG), and the stage methods agree with it."""
    pipe.memorize(book)
    q = "Who lives at number four, Privet Drive?"
    events = list(pipe.stream(q, "memorag", max_new_tokens=6, use_memory_answer=True))
    assert events[-1].kind == "final" and all(e.kind == "token" for e in events[:-1])
    r = events[-1].result
    assert r.collection == "bundle" and [u.unit_id for u in r.units] == ["bundle"] and r.clues[0].unit_id == "bundle"
    assert len(r.evidence) == pipe.ret_hit  # no "The answer might be" line beside the passages
    assert r.answer == "".join(e.text for e in events[:-1]).strip() == pipe(query=q, max_new_tokens=6,
                                                                           use_memory_answer=True)
    clues = pipe.clues(q, use_memory_answer=True)
    assert [h.chunk_id for h in pipe.evidence(q, clues)] == [int(e.chunk_id) for e in r.evidence]
    assert pipe.answer_from_evidence(q, [e.text for e in r.evidence], max_new_tokens=6) == r.answer
    qa = pipe.stream(q, "qa", max_new_tokens=4)
    qa = [e for e in qa if e.kind == "final"][0].result
    assert qa.units == [] and qa.clues == [] and qa.retrieval_queries == [("question", q)]
    assert [int(e.chunk_id) for e in qa.evidence] == [h.chunk_id for h in pipe.evidence(q, None, task="qa")]
    with pytest.raises(InvalidInputError, match="placeholder"):
        pipe(query=q, prompt_template="{nope} {context}", max_new_tokens=2)
