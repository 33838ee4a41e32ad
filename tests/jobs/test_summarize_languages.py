"""A Chinese corpus is summarized in Chinese and an English one in English (embedded SmolLM2-135M-Instruct, the
real model; small texts and token budgets, since it decodes ~10 tokens/s on the development CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memorag_core.prompts import detect_language


def cjk_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    cjk = sum(1 for c in letters if "\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf")
    return cjk / len(letters) if letters else 0.0


def excerpts(path: Path, starts: list[int], chars: int) -> dict[str, str]:
    text = path.read_text(encoding="utf-8")
    return {f"part-{i}": " ".join(text[s:s + chars].split()) for i, s in enumerate(starts)}


@pytest.mark.slow
def test_chinese_corpus_is_summarized_in_chinese_and_english_in_english(ray_local, tmp_path, shared_data_dir):
    from jobs.memorize import run_memorize_job
    from jobs.summarize import SummarizeJobConfig, run_summarize_job
    from memorag_core.store.summaries import SummaryStore
    from tests.fixtures.collections import facts_job_config

    store = str(tmp_path / "store")
    corpora = {"zh": excerpts(shared_data_dir / "fortress_besieged.txt", [3000, 20000], 260),
               "en": excerpts(shared_data_dir / "harry_potter.txt", [5000, 60000], 700)}
    for lang, docs in corpora.items():
        corpus = tmp_path / f"{lang}.jsonl"
        corpus.write_text("".join(json.dumps({"doc_id": k, "text": v}, ensure_ascii=False) + "\n"
                                  for k, v in docs.items()))
        # one unit per excerpt (boundary after every document; 260 Chinese characters are ~450 SmolLM2 tokens, so
        # the unit bound is above that), small chunks
        run_memorize_job(facts_job_config(corpus, store, None, collection=f"book-{lang}", window=128,
                                          pack={"unit_tokens": 1024, "boundary_every": 1},
                                          chunk_embed={"chunk_tokens": 96}))
        run_summarize_job(SummarizeJobConfig.model_validate({
            "store": store, "collection": f"book-{lang}", "generator": "memory", "key_point_tokens": 24,
            "top_k": 2, "max_new_tokens": 32, "reduce_max_new_tokens": 32, "batch_size": 2, "num_cpus": 0.5,
            "device": "cpu"}))
    for lang in corpora:
        stored = SummaryStore(store).open(f"book-{lang}")
        texts = stored.units.column("summary").to_pylist() + stored.collection.column("summary").to_pylist()
        assert len(texts) == 3 and all(t.strip() for t in texts), texts
        assert not any(t.endswith("\ufffd") for t in texts), texts  # no character cut by the token budget
        assert set(stored.units.column("language").to_pylist()) == {lang}
        for t in texts:
            if lang == "zh":
                assert detect_language(t) == "zh" and cjk_share(t) >= 0.5, t
            else:
                assert detect_language(t) == "en" and cjk_share(t) == 0.0, t
