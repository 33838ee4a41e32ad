"""Retrieval fixtures: the embedded MiniLM embedder, the SmolLM2 / MiniLM tokenizers, tiny random encoders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def minilm_embedder():
    """The real embedded all-MiniLM-L6-v2 through the sentence-transformers backend (CPU)."""
    from memorag_core.retrieval import EmbedderConfig, load_embedder

    return load_embedder(EmbedderConfig(device="cpu"))


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The embedded SmolLM2 tokenizer (byte-level BPE), the chunker's default."""
    from memorag_core.models import load_tokenizer

    return load_tokenizer(None)


@pytest.fixture(scope="session")
def minilm_tokenizer():
    """The embedded MiniLM WordPiece tokenizer (a real BERT tokenizer)."""
    from transformers import AutoTokenizer

    from memorag_core.models import embedded_embedder_path

    return AutoTokenizer.from_pretrained(str(embedded_embedder_path()))


def build_tiny_encoder(folder: Path, arch: str = "bert", pooling_file: str | None = None, seed: int = 0) -> Path:
    """Save a 2-layer random BERT or XLM-R encoder (hidden 32) with the real MiniLM tokenizer into ``folder``.

    ``pooling_file`` ``"cls"``/``"mean"`` also writes a sentence-transformers ``1_Pooling/config.json``.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer, BertConfig, XLMRobertaConfig

    from memorag_core.models import embedded_embedder_path

    tok = AutoTokenizer.from_pretrained(str(embedded_embedder_path()))
    cls = {"bert": BertConfig, "xlm-roberta": XLMRobertaConfig}[arch]
    config = cls(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, max_position_embeddings=520, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    if pooling_file is not None:
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": 32,
            "pooling_mode_cls_token": pooling_file == "cls",
            "pooling_mode_mean_tokens": pooling_file == "mean",
            "pooling_mode_max_tokens": False,
        }))
    return folder
