"""FAISS vector index over float32 embeddings: flat or IVF, inner product / cosine / L2, int64 ids.

* ``metric="ip"``: scores are inner products, higher is better (use with normalized embeddings).
* ``metric="cosine"``: vectors and queries are L2-normalized on the way in, then inner product; scores are cosine
  similarities in [-1, 1], higher is better.
* ``metric="l2"``: scores are **squared** L2 distances, lower is better (FAISS's convention).

Flat indexes are exact. IVF (``IndexIVFFlat``) clusters the vectors into ``nlist`` lists with k-means
(:meth:`VectorIndex.train`, which needs at least ``nlist`` vectors and ideally ~39 per list) and searches the
``nprobe`` nearest lists. For sharded builds, train one index on a sample, then give each shard
:meth:`VectorIndex.clone_empty` of it (same quantizer), and :meth:`VectorIndex.merge_from` the shards.

Serialization is FAISS's own (``faiss.serialize_index``), never pickle. ``nprobe`` is a search-time setting: it
comes from the config passed to :meth:`VectorIndex.from_bytes`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from memorag_core.errors import CorruptArtifactError, InvalidInputError, MemoryNotReadyError

logger = logging.getLogger(__name__)

_KINDS = ("flat", "ivf")
_METRICS = ("ip", "cosine", "l2")


@dataclass
class IndexConfig:
    """FAISS index choices. Validated on construction."""

    kind: str = field(default="flat", metadata={"description": "'flat' (exact) or 'ivf' (inverted lists, approximate)"})
    metric: str = field(
        default="ip",
        metadata={"description": "'ip' (inner product), 'cosine' (normalized ip), 'l2' (squared distance, lower=better)"},
    )
    nlist: int = field(default=256, metadata={"description": "IVF: number of k-means lists; train needs >= nlist vectors"})
    nprobe: int = field(default=16, metadata={"description": "IVF: lists searched per query (recall vs speed)"})

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise InvalidInputError(f"IndexConfig.kind must be one of {_KINDS}, got {self.kind!r}")
        if self.metric not in _METRICS:
            raise InvalidInputError(f"IndexConfig.metric must be one of {_METRICS}, got {self.metric!r}")
        for name in ("nlist", "nprobe"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidInputError(f"IndexConfig.{name} must be a positive int, got {value!r}")

    @property
    def higher_is_better(self) -> bool:
        """True for ip/cosine (similarities), False for l2 (distances)."""
        return self.metric != "l2"


class VectorIndex:
    """A FAISS index with int64 ids, validated inputs and byte serialization.

    Args:
        dim: vector size, > 0.
        config: kind, metric, nlist, nprobe.

    Raises:
        InvalidInputError: ``dim <= 0``.
    """

    def __init__(self, dim: int, config: IndexConfig | None = None):
        if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim <= 0:
            raise InvalidInputError(f"dim must be a positive int, got {dim!r}")
        self.dim = int(dim)
        self.config = config if config is not None else IndexConfig()
        self.index = self._build()

    # -- construction -------------------------------------------------------------------------------------------
    def _faiss_metric(self) -> int:
        import faiss

        return faiss.METRIC_L2 if self.config.metric == "l2" else faiss.METRIC_INNER_PRODUCT

    def _build(self):
        import faiss

        metric = self._faiss_metric()
        # IndexFlatIP/IndexFlatL2 (not IndexFlat(d, metric)): deserialized indexes come back as these types, and
        # FAISS only merges indexes of the same C++ type.
        flat_cls = faiss.IndexFlatL2 if self.config.metric == "l2" else faiss.IndexFlatIP
        if self.config.kind == "flat":
            return faiss.IndexIDMap2(flat_cls(self.dim))
        quantizer = flat_cls(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, self.config.nlist, metric)
        index.own_fields = True
        quantizer.this.disown()  # the IVF index owns (and frees) its quantizer
        index.nprobe = self.config.nprobe
        return index

    # -- validation ---------------------------------------------------------------------------------------------
    def check_vectors(self, x: np.ndarray, what: str = "vectors") -> np.ndarray:
        """``x`` as contiguous float32 ``(n, dim)``, normalized when the metric is cosine; InvalidInputError
        naming ``what`` for a wrong shape, an empty or non-numeric array, NaN or inf."""
        x = np.asarray(x)
        if x.ndim == 1:
            x = x.reshape(1, -1)  # (1, dim)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise InvalidInputError(f"{what} must have shape (n, {self.dim}), got {x.shape}")
        if x.shape[0] == 0:
            raise InvalidInputError(f"{what} is empty (0 vectors)")
        if not np.issubdtype(x.dtype, np.number):
            raise InvalidInputError(f"{what} must be numeric, got dtype {x.dtype}")
        x = np.ascontiguousarray(x, dtype=np.float32)  # (n, dim)
        if not np.isfinite(x).all():
            raise InvalidInputError(f"{what} contains NaN or inf")
        if self.config.metric == "cosine":
            norms = np.linalg.norm(x, axis=1, keepdims=True)  # (n, 1)
            x = x / np.maximum(norms, 1e-12)  # (n, dim)
        return x

    # -- API ----------------------------------------------------------------------------------------------------
    @property
    def is_trained(self) -> bool:
        """Flat indexes are always trained; IVF after :meth:`train`."""
        return bool(self.index.is_trained)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def train(self, x: np.ndarray) -> None:
        """Train the IVF quantizer with k-means on ``x`` ``(n, dim)``; a no-op for flat indexes.

        Raises:
            InvalidInputError: ``n < nlist`` (k-means cannot make nlist lists), or a bad array.
        """
        x = self.check_vectors(x, "training vectors")
        if self.config.kind == "flat":
            return
        nlist = self.config.nlist
        if x.shape[0] < nlist:
            raise InvalidInputError(
                f"IVF training needs at least nlist={nlist} vectors, got {x.shape[0]}; lower nlist or use kind='flat'"
            )
        if x.shape[0] < 39 * nlist:
            logger.warning("IVF training on %d vectors for nlist=%d (FAISS advises >= %d): lists will be uneven",
                           x.shape[0], nlist, 39 * nlist)
        self.index.train(x)
        logger.info("trained IVF (nlist %d, metric %s) on %d vectors", nlist, self.config.metric, x.shape[0])

    def add(self, x: np.ndarray, ids: np.ndarray | None = None) -> None:
        """Add vectors ``x`` ``(n, dim)`` with int64 ``ids`` ``(n,)``; default ``len(self), len(self)+1, ...``.

        Raises:
            MemoryNotReadyError: an IVF index that has not been trained.
            InvalidInputError: wrong shape, non-finite values, ids of the wrong length, non-integer or negative.
        """
        x = self.check_vectors(x, "vectors")
        if not self.is_trained:
            raise MemoryNotReadyError("the IVF index is not trained: call train() (or use clone_empty() of a "
                                      "trained index) before add()")
        if ids is None:
            ids = np.arange(len(self), len(self) + x.shape[0], dtype=np.int64)  # (n,)
        else:
            ids = np.asarray(ids)
            if ids.shape != (x.shape[0],):
                raise InvalidInputError(f"ids must have shape ({x.shape[0]},), got {ids.shape}")
            if ids.size and not np.issubdtype(ids.dtype, np.integer):
                raise InvalidInputError(f"ids must be integers, got dtype {ids.dtype}")
            if (ids < 0).any():
                raise InvalidInputError("ids must be >= 0 (-1 marks missing results)")
            ids = np.ascontiguousarray(ids, dtype=np.int64)  # (n,)
        self.index.add_with_ids(x, ids)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best vectors for each query.

        Args:
            q: ``(nq, dim)`` (or ``(dim,)``) queries.
            k: results per query, > 0; when fewer vectors exist the rest is padded.

        Returns:
            ``scores`` ``(nq, k)`` float32 (similarities for ip/cosine, squared distances for l2) and ``ids``
            ``(nq, k)`` int64, best first, padded with id ``-1`` (and score -inf for ip/cosine, +inf for l2).

        Raises:
            InvalidInputError: ``k <= 0`` or a bad query array.
        """
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k <= 0:
            raise InvalidInputError(f"k must be a positive int, got {k!r}")
        q = self.check_vectors(q, "queries")  # (nq, dim)
        if self.config.kind == "ivf":
            self.index.nprobe = self.config.nprobe
        scores, ids = self.index.search(q, int(k))  # (nq, k), (nq, k)
        pad = ids < 0
        scores[pad] = np.inf if self.config.metric == "l2" else -np.inf
        return scores.astype(np.float32), ids.astype(np.int64)

    def reset(self) -> None:
        """Remove all vectors (an IVF index stays trained)."""
        self.index.reset()

    def ids(self) -> np.ndarray:
        """All stored ids, ``(n,)`` int64 (order: insertion order for flat, list order for IVF)."""
        import faiss

        if self.config.kind == "flat":
            return faiss.vector_to_array(self.index.id_map).astype(np.int64)
        invlists = self.index.invlists
        out = [faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
               for i in range(self.index.nlist) if invlists.list_size(i)]
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)

    # -- shards -------------------------------------------------------------------------------------------------
    def clone_empty(self) -> "VectorIndex":
        """An empty index with the same config and (for IVF) the same trained quantizer, for per-shard adds.

        Raises:
            MemoryNotReadyError: an IVF index that is not trained yet.
        """
        if self.config.kind == "ivf" and not self.is_trained:
            raise MemoryNotReadyError("clone_empty() of an untrained IVF index: train() it first on a sample")
        clone = VectorIndex.from_bytes(self.to_bytes(), self.config)
        clone.reset()
        return clone

    def _centroids(self) -> np.ndarray:
        quantizer = self.index.quantizer
        return quantizer.reconstruct_n(0, quantizer.ntotal)  # (nlist, dim)

    def merge_from(self, other: "VectorIndex") -> None:
        """Append all vectors of ``other`` (left unchanged); ids are kept as they are (duplicates allowed).

        Raises:
            InvalidInputError: different dim/kind/metric, or IVF shards with different quantizers (build shards
                with :meth:`clone_empty` of one trained index).
        """
        if not isinstance(other, VectorIndex):
            raise InvalidInputError(f"merge_from takes a VectorIndex, got {type(other).__name__}")
        if (other.dim, other.config.kind, other.config.metric) != (self.dim, self.config.kind, self.config.metric):
            raise InvalidInputError(
                f"cannot merge an index (dim {other.dim}, {other.config.kind}, {other.config.metric}) into one "
                f"(dim {self.dim}, {self.config.kind}, {self.config.metric})"
            )
        if len(other) == 0:
            return
        if self.config.kind == "ivf":
            if not (self.is_trained and other.is_trained):
                raise MemoryNotReadyError("merge_from needs trained IVF indexes")
            if self.index.nlist != other.index.nlist or not np.array_equal(self._centroids(), other._centroids()):
                raise InvalidInputError("IVF shards have different quantizers: train one index, then build each "
                                        "shard from its clone_empty()")
        copy = VectorIndex.from_bytes(other.to_bytes(), other.config)  # faiss's merge empties its argument
        self.index.merge_from(copy.index, 0)

    # -- bytes --------------------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """FAISS's own serialization of the index (ids and, for IVF, the quantizer included)."""
        import faiss

        return faiss.serialize_index(self.index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, config: IndexConfig | None = None) -> "VectorIndex":
        """Rebuild an index from :meth:`to_bytes` output; ``config`` must describe the same kind and metric.

        Raises:
            CorruptArtifactError: the bytes do not deserialize, or describe a different kind/metric than config.
        """
        import faiss

        config = config if config is not None else IndexConfig()
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
            raise CorruptArtifactError("index bytes are empty or not bytes")
        try:
            index = faiss.deserialize_index(np.frombuffer(bytes(data), dtype=np.uint8))
        except Exception as exc:  # faiss raises RuntimeError with its C++ message
            raise CorruptArtifactError(f"index bytes do not deserialize as a FAISS index: {exc}") from exc
        kind = "ivf" if isinstance(index, faiss.IndexIVF) else "flat" if isinstance(index, faiss.IndexIDMap) else None
        if kind is None:
            raise CorruptArtifactError(f"unexpected FAISS index type {type(index).__name__}")
        metric_ok = (index.metric_type == faiss.METRIC_L2) == (config.metric == "l2")
        if kind != config.kind or not metric_ok:
            raise CorruptArtifactError(
                f"the stored index is {kind} with FAISS metric {index.metric_type}, but the config asks for "
                f"{config.kind}/{config.metric}"
            )
        if kind == "ivf" and index.nlist != config.nlist:
            logger.info("stored IVF index has nlist %d (config says %d): using the stored one",
                        index.nlist, config.nlist)
        obj = cls.__new__(cls)
        obj.dim = int(index.d)
        obj.config = config
        obj.index = index
        if kind == "ivf":
            index.nprobe = config.nprobe
        return obj
