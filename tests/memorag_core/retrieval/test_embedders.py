"""Embedders: pooling checked numerically against hand computations, real MiniLM ranking, config and errors."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch

from memorag_core.errors import InvalidInputError, ModelNotFoundError, OptionalDependencyError
from memorag_core.models import embedded_embedder_path
from memorag_core.retrieval import (
    EmbedderConfig,
    HFEmbedder,
    SentenceTransformerEmbedder,
    load_embedder,
    read_folder_pooling,
)
from tests.memorag_core.retrieval.conftest import build_tiny_encoder

TEXTS = [
    "A short one.",
    "A considerably longer sentence, so that the batch needs padding for the shorter texts in it.",
    "Third text about embeddings and pooling.",
]


def _manual(folder, texts, pooling, max_length=512):
    """Hand computation: AutoModel last_hidden_state -> CLS or masked mean -> L2 normalize. (n, dim)."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state  # (n, seq, dim)
    if pooling == "cls":
        v = h[:, 0]  # (n, dim)
    else:
        m = enc["attention_mask"].unsqueeze(-1).float()  # (n, seq, 1)
        v = (h * m).sum(1) / m.sum(1)  # (n, dim)
    v = v.numpy()
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("arch", ["bert", "xlm-roberta"])
def test_hf_cls_pooling_matches_hand_computation(tmp_path, arch, caplog):
    folder = build_tiny_encoder(tmp_path / arch, arch=arch, pooling_file="cls")
    with caplog.at_level(logging.INFO, logger="memorag_core.retrieval.embedders"):
        emb = load_embedder(EmbedderConfig(model=str(folder), backend="hf", device="cpu"))
    assert isinstance(emb, HFEmbedder) and emb.pooling == "cls" and emb.dim == 32
    assert "1_Pooling" in caplog.text and "cls" in caplog.text  # the decision and its source are logged
    got = emb.encode(TEXTS, batch_size=2)
    assert got.shape == (3, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, _manual(folder, TEXTS, "cls"), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # CLS differs from mean on the same model: the pooling choice really changes the output.
    assert not np.allclose(got, _manual(folder, TEXTS, "mean"), atol=1e-3)


def test_hf_pooling_from_config_entry_and_argument(tmp_path):
    import json

    folder = build_tiny_encoder(tmp_path / "m")
    with pytest.raises(InvalidInputError, match="pooling"):
        HFEmbedder(str(folder), device="cpu")  # no 1_Pooling, no config entry, pooling auto
    cfg = json.loads((folder / "config.json").read_text())
    cfg["pooling"] = "mean"
    (folder / "config.json").write_text(json.dumps(cfg))
    assert read_folder_pooling(folder)[0] == "mean"
    emb = HFEmbedder(str(folder), device="cpu")
    np.testing.assert_allclose(emb.encode(TEXTS), _manual(folder, TEXTS, "mean"), atol=1e-5)
    emb = HFEmbedder(str(folder), pooling="cls", device="cpu")  # explicit argument wins
    np.testing.assert_allclose(emb.encode(TEXTS), _manual(folder, TEXTS, "cls"), atol=1e-5)


def test_unsupported_folder_pooling_is_named(tmp_path):
    import json

    folder = build_tiny_encoder(tmp_path / "m", pooling_file="mean")
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(InvalidInputError, match="max_tokens"):
        HFEmbedder(str(folder), device="cpu")


def test_minilm_sentence_transformers_mean_pooling(minilm_embedder):
    assert isinstance(minilm_embedder, SentenceTransformerEmbedder)
    assert minilm_embedder.dim == 384 and minilm_embedder.pooling == "mean"
    got = minilm_embedder.encode(TEXTS)
    # The folder's max_seq_length is 256; the texts are far shorter, so no truncation differs.
    np.testing.assert_allclose(got, _manual(embedded_embedder_path(), TEXTS, "mean"), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # Batching does not change the vectors (padding is masked).
    np.testing.assert_allclose(minilm_embedder.encode(TEXTS, batch_size=1), got, atol=1e-5)


def test_hf_mean_backend_equals_sentence_transformers(minilm_embedder):
    hf = load_embedder(EmbedderConfig(backend="hf", device="cpu"))  # pooling read from 1_Pooling: mean
    assert isinstance(hf, HFEmbedder) and hf.pooling == "mean"
    np.testing.assert_allclose(hf.encode(TEXTS), minilm_embedder.encode(TEXTS), atol=1e-5)


def test_minilm_ranks_matching_passage_first(minilm_embedder):
    passages = [
        "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
        "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar.",
        "The stock market dropped sharply after the central bank raised interest rates.",
        "A good sourdough bread needs a lively starter and a long, slow fermentation.",
        "The Great Barrier Reef off Australia is the largest coral reef system in the world.",
    ]
    queries = [
        "famous landmark in the French capital",
        "how do plants make food from light",
        "why did share prices fall",
        "baking bread with natural yeast",
        "biggest coral reef",
    ]
    p = minilm_embedder.encode(passages)  # (5, 384)
    q = minilm_embedder.encode(queries, is_query=True)  # (5, 384)
    scores = q @ p.T  # (5, 5)
    assert scores.argmax(axis=1).tolist() == [0, 1, 2, 3, 4]


def test_query_instruction_is_prepended_for_queries_only(tmp_path):
    folder = build_tiny_encoder(tmp_path / "m", pooling_file="cls")
    instr = "Represent this sentence for searching relevant passages: "
    emb = load_embedder(EmbedderConfig(model=str(folder), query_instruction=instr, device="cpu"))
    q = emb.encode(["what is pooling"], is_query=True)
    np.testing.assert_allclose(q, emb.encode([instr + "what is pooling"]), atol=1e-6)
    assert not np.allclose(q, emb.encode(["what is pooling"]), atol=1e-4)


def test_auto_backend_choice(tmp_path, minilm_embedder):
    folder = build_tiny_encoder(tmp_path / "m", pooling_file="cls")  # no modules.json: not an ST folder
    assert isinstance(load_embedder(str(folder)), HFEmbedder)


def test_bad_inputs(minilm_embedder, tmp_path):
    with pytest.raises(InvalidInputError, match="empty"):
        minilm_embedder.encode([])
    with pytest.raises(InvalidInputError, match=r"texts\[1\]"):
        minilm_embedder.encode(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(InvalidInputError, match="single str"):
        minilm_embedder.encode("not a list")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="batch_size"):
        minilm_embedder.encode(["ok"], batch_size=0)
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        load_embedder(str(tmp_path / "no-such-model"))
    with pytest.raises(ModelNotFoundError, match="nobody/no-such-model"):
        load_embedder("nobody/no-such-model")  # HF_HUB_OFFLINE=1 in tests: not in the cache
    with pytest.raises(InvalidInputError, match="backend"):
        EmbedderConfig(backend="onnx")
    with pytest.raises(InvalidInputError, match="pooling"):
        EmbedderConfig(pooling="max")


def test_flagembedding_unavailable_is_explained(monkeypatch):
    # FlagEmbedding is not installed here (and 1.4.2 does not import with transformers 5); force the failure so
    # the test means the same wherever it runs.
    monkeypatch.setitem(sys.modules, "FlagEmbedding", None)
    with pytest.raises(OptionalDependencyError, match="FlagEmbedding.*transformers 5"):
        load_embedder(EmbedderConfig(backend="flagembedding", model="BAAI/bge-m3"))


def test_backend_and_folder_mismatches_are_explained(tmp_path):
    import json

    plain = build_tiny_encoder(tmp_path / "plain", pooling_file="cls")
    with pytest.raises(InvalidInputError, match="not a sentence-transformers folder"):
        load_embedder(EmbedderConfig(model=str(plain), backend="sentence-transformers"))
    with pytest.raises(InvalidInputError, match="conflicts with 'mean'"):
        load_embedder(EmbedderConfig(backend="sentence-transformers", pooling="cls"))  # MiniLM folder is mean
    dense = build_tiny_encoder(tmp_path / "dense", pooling_file="cls")
    (dense / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    ]))
    with pytest.raises(InvalidInputError, match=r"\['Dense'\]"):
        HFEmbedder(str(dense), device="cpu")


def test_chunk_size_fits_the_embedder_and_longer_passages_are_refused(minilm_embedder, caplog):
    from memorag_core.retrieval import chunk_size_for, max_chunk_tokens

    assert minilm_embedder.max_tokens == 256 and max_chunk_tokens(minilm_embedder) == 254
    assert chunk_size_for(minilm_embedder, None) == 254 and chunk_size_for(minilm_embedder, 200) == 200
    with pytest.raises(InvalidInputError, match="exceeds what the embedder"):
        chunk_size_for(minilm_embedder, 512)  # half of each chunk would never be embedded
    long_text = "word " * 300
    with pytest.raises(InvalidInputError, match="exceed the 254 tokens"):
        minilm_embedder.check_fits([long_text])  # what the retriever calls before indexing passages
    with caplog.at_level("WARNING"):
        assert minilm_embedder.encode([long_text], is_query=True).shape == (1, 384)
    assert "only the first 254 tokens" in caplog.text  # a query (or gist) is embedded cut, never silently
