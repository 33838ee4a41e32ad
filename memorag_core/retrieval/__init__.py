"""Retrieval: token-bounded chunking, embedders, FAISS indexes and multi-query dense retrieval.

Heavy libraries (torch, transformers, sentence-transformers, faiss) are imported where they are used, so importing
this package is cheap.
"""

from memorag_core.retrieval.chunker import Chunk, TokenChunker
from memorag_core.retrieval.embedders import (
    Embedder,
    EmbedderConfig,
    FlagEmbeddingEmbedder,
    HFEmbedder,
    SentenceTransformerEmbedder,
    chunk_size_for,
    l2_normalize,
    load_embedder,
    max_chunk_tokens,
    read_folder_pooling,
)
from memorag_core.retrieval.index import IndexConfig, VectorIndex
from memorag_core.retrieval.retriever import DenseRetriever, Hit

__all__ = [
    "Chunk",
    "TokenChunker",
    "Embedder",
    "EmbedderConfig",
    "FlagEmbeddingEmbedder",
    "HFEmbedder",
    "SentenceTransformerEmbedder",
    "chunk_size_for",
    "l2_normalize",
    "max_chunk_tokens",
    "load_embedder",
    "read_folder_pooling",
    "IndexConfig",
    "VectorIndex",
    "DenseRetriever",
    "Hit",
]
