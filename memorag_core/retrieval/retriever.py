"""Dense retrieval over a list of passages: embed, index, multi-query search with de-duplication.

This is the retrieval step of MemoRAG: the question and the memory's clues are all queries; each fetches its top
``hits`` passages (upstream default 3), the union is de-duplicated by passage id (keeping each passage's best score
and the query that gave it), and the passages are returned **in corpus order** (ascending chunk id), as upstream
``MemoRAG._retrieve`` does (``sorted(set(indices))``), so the generator reads evidence in the order of the text.

Building (``add``) and answering (``search``) share the embedder; the index and corpus can be saved as bytes +
a list of strings (:meth:`DenseRetriever.index_bytes`, :attr:`DenseRetriever.corpus`) and restored with
:meth:`DenseRetriever.from_parts`; :meth:`DenseRetriever.write_to` and :meth:`DenseRetriever.read_from` put both in a
checksummed bundle as ``chunks.parquet`` + ``index.faiss`` (the facade's bundles and the evaluation's pooled index).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from memorag_core.errors import CorruptArtifactError, InvalidInputError, MemoryNotReadyError
from memorag_core.retrieval.embedders import Embedder
from memorag_core.retrieval.index import IndexConfig, VectorIndex

if TYPE_CHECKING:
    from memorag_core.store.bundle import Bundle

logger = logging.getLogger(__name__)

CORPUS_FILE, INDEX_FILE = "chunks.parquet", "index.faiss"


@dataclass
class Hit:
    """One retrieved passage.

    Attributes:
        chunk_id: position of the passage in the retriever's corpus.
        score: its best score over the queries (similarity for ip/cosine; squared L2 distance, lower = better,
            for l2).
        text: the passage.
        query: the query that gave that best score.
    """

    chunk_id: int
    score: float
    text: str
    query: str


def _check_hits(hits: int) -> int:
    if not isinstance(hits, (int, np.integer)) or isinstance(hits, bool) or hits <= 0:
        raise InvalidInputError(f"hits must be a positive int, got {hits!r}")
    return int(hits)


class DenseRetriever:
    """Embeds passages into a :class:`VectorIndex` and answers multi-query searches.

    Args:
        embedder: any :class:`Embedder` (passages embedded with ``is_query=False``, queries with ``True``).
        index_config: flat/IVF and metric. An IVF index is trained on the first :meth:`add` batch, which must
            then hold at least ``nlist`` passages.
        hits: default passages per query (upstream: 3).

    Attributes:
        corpus: the passages, ``corpus[chunk_id]``.
    """

    def __init__(self, embedder: Embedder, index_config: IndexConfig | None = None, hits: int = 3):
        if not isinstance(embedder, Embedder):
            raise InvalidInputError(f"embedder must be an Embedder, got {type(embedder).__name__}")
        self.embedder = embedder
        self.index_config = index_config if index_config is not None else IndexConfig()
        self.hits = _check_hits(hits)
        self.corpus: list[str] = []
        self.index = VectorIndex(embedder.dim, self.index_config)

    def __len__(self) -> int:
        return len(self.corpus)

    def add(self, texts: list[str]) -> None:
        """Embed and index passages; their chunk ids continue from ``len(self.corpus)``.

        Raises:
            InvalidInputError: not a non-empty list of str, a passage longer than the embedder embeds, or an
                untrained IVF index given < nlist passages.
        """
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise InvalidInputError(f"texts must be a list of str, got {type(texts).__name__}")
        check = getattr(self.embedder, "check_fits", None)
        if check is not None and all(isinstance(t, str) for t in texts):
            check(list(texts))  # a chunk the embedder would cut is refused, never indexed half-embedded
        vectors = self.embedder.encode(list(texts), is_query=False)  # (n, dim); validates the texts
        if not self.index.is_trained:
            logger.info("training the IVF index on the first %d passages", len(texts))
            self.index.train(vectors)
        ids = np.arange(len(self.corpus), len(self.corpus) + len(texts), dtype=np.int64)  # (n,)
        self.index.add(vectors, ids)
        self.corpus.extend(texts)
        logger.debug("indexed %d passages (total %d)", len(texts), len(self.corpus))

    def remove_all(self) -> None:
        """Forget every passage (a trained IVF index keeps its quantizer)."""
        self.corpus = []
        self.index.reset()

    def search(self, queries: list[str] | str, hits: int | None = None) -> list[Hit]:
        """Multi-query search, de-duplicated, in corpus order.

        Args:
            queries: non-empty list of query strings (a single str is taken as one query); all are embedded in one
                batch with the query instruction.
            hits: passages per query (default ``self.hits``); capped at the corpus size.

        Returns:
            at most ``len(queries) * hits`` :class:`Hit` s, one per distinct passage, sorted by ``chunk_id``
            (upstream order); each carries its best score over the queries and the query that gave it.

        Raises:
            InvalidInputError: empty/non-str queries, ``hits <= 0``.
            MemoryNotReadyError: nothing has been added.
        """
        if isinstance(queries, str):
            queries = [queries]
        k = self.hits if hits is None else _check_hits(hits)
        if not self.corpus:
            raise MemoryNotReadyError("search() before any passage was added to the retriever")
        if isinstance(queries, (list, tuple)) and any(isinstance(q, str) and not q.strip() for q in queries):
            raise InvalidInputError("queries contain an empty string")
        q = self.embedder.encode(list(queries) if isinstance(queries, tuple) else queries, is_query=True)  # (nq, dim)
        scores, ids = self.index.search(q, min(k, len(self.corpus)))  # (nq, k), (nq, k)
        higher = self.index_config.higher_is_better
        best: dict[int, tuple[float, str]] = {}
        for qi, query in enumerate(queries):
            for score, cid in zip(scores[qi].tolist(), ids[qi].tolist()):
                if cid < 0:
                    continue
                old = best.get(cid)
                if old is None or (score > old[0] if higher else score < old[0]):
                    best[cid] = (score, query)
        return [Hit(chunk_id=cid, score=s, text=self.corpus[cid], query=qr)
                for cid, (s, qr) in sorted(best.items())]

    def index_bytes(self) -> bytes:
        """The FAISS index as bytes (``faiss.serialize_index``); store it beside :attr:`corpus`."""
        return self.index.to_bytes()

    @classmethod
    def from_parts(cls, embedder: Embedder, corpus: list[str], index_bytes: bytes,
                   index_config: IndexConfig | None = None, hits: int = 3) -> "DenseRetriever":
        """Restore a retriever from its corpus and :meth:`index_bytes`.

        Raises:
            CorruptArtifactError: the bytes do not deserialize, or the index does not match the corpus (count,
                ids) or the embedder (dim).
            InvalidInputError: corpus is not a list of str.
        """
        if not isinstance(corpus, (list, tuple)) or not all(isinstance(t, str) for t in corpus):
            raise InvalidInputError("corpus must be a list of str")
        obj = cls(embedder, index_config, hits)
        index = VectorIndex.from_bytes(index_bytes, obj.index_config)
        if index.dim != embedder.dim:
            raise CorruptArtifactError(f"stored index has dim {index.dim}, the embedder gives {embedder.dim}")
        if len(index) != len(corpus):
            raise CorruptArtifactError(f"stored index holds {len(index)} vectors but the corpus has {len(corpus)}")
        if len(corpus) and not np.array_equal(np.sort(index.ids()), np.arange(len(corpus))):
            raise CorruptArtifactError("stored index ids are not 0..len(corpus)-1")
        obj.index = index
        obj.corpus = list(corpus)
        return obj

    def write_to(self, bundle: "Bundle") -> None:
        """Stage the corpus (``chunks.parquet``, one ``text`` column) and the index (``index.faiss``) in ``bundle``;
        the caller commits it."""
        import pyarrow as pa

        bundle.write_table(CORPUS_FILE, pa.table({"text": pa.array(self.corpus, pa.string())}))
        bundle.write_bytes(INDEX_FILE, self.index_bytes())

    @classmethod
    def read_from(cls, bundle: "Bundle", embedder: Embedder, index_config: IndexConfig | None = None,
                  hits: int = 3) -> "DenseRetriever":
        """Restore what :meth:`write_to` staged in a committed bundle (checksums verified by the bundle).

        Raises:
            ArtifactNotFoundError: the bundle or one of its two files is missing.
            CorruptArtifactError: a checksum or the index does not match (see :meth:`from_parts`).
        """
        corpus = [str(t) for t in bundle.read_table(CORPUS_FILE).column("text").to_pylist()]
        return cls.from_parts(embedder, corpus, bundle.read_bytes(INDEX_FILE), index_config, hits=hits)
