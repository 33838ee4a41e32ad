"""Text embedders: batched, L2-normalized float32 vectors from sentence-transformers, plain transformers or
FlagEmbedding.

Backends (``EmbedderConfig.backend``):

* ``"sentence-transformers"`` (:class:`SentenceTransformerEmbedder`): a sentence-transformers folder with its own
  modules (``modules.json``, ``1_Pooling/config.json``); the embedded all-MiniLM-L6-v2 (mean pooling) and BGE /
  BGE-M3 (CLS pooling) checkpoints ship such folders.
* ``"hf"`` (:class:`HFEmbedder`): ``AutoModel`` + pooling over ``last_hidden_state``, ``"cls"`` (BGE, BGE-M3's
  dense output) or ``"mean"`` (masked mean).
* ``"flagembedding"`` (:class:`FlagEmbeddingEmbedder`): optional; FlagEmbedding 1.4.2 does not import with
  transformers 5.x, so this backend raises :class:`~memorag_core.errors.OptionalDependencyError` saying so.
* ``"auto"``: sentence-transformers when the folder has ``modules.json`` and ``pooling="auto"``, else hf.

Pooling is decided from the model folder, never from the model's name, and the decision is logged: the
sentence-transformers ``1_Pooling/config.json`` when present, else an explicit ``"pooling"`` entry in the model's
``config.json``, else the ``pooling=`` argument; with ``pooling="auto"`` and none of these, loading fails naming
the folder. With the hf backend an explicit ``pooling=`` argument wins over the folder (the override is logged);
the sentence-transformers backend always uses the folder's modules and refuses a conflicting ``pooling=``, a
folder without ``modules.json`` (it would silently mean-pool), and the hf backend refuses a sentence-transformers
folder with modules it cannot apply (``Dense`` and the like).

``is_query=True`` prepends the configured query instruction (BGE v1.5 style, e.g.
``"Represent this sentence for searching relevant passages: "``); passages never get it.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from memorag_core.errors import InvalidInputError, ModelNotFoundError, OptionalDependencyError

logger = logging.getLogger(__name__)

Pooling = Literal["cls", "mean"]
_BACKENDS = ("auto", "sentence-transformers", "hf", "flagembedding")
_POOLINGS = ("auto", "cls", "mean")


@dataclass
class EmbedderConfig:
    """How to build an embedder. Validated on construction."""

    model: str | None = field(
        default=None,
        metadata={"description": "local folder or hub id; None (or 'embedded:all-minilm-l6-v2') = embedded MiniLM"},
    )
    backend: str = field(
        default="auto",
        metadata={"description": "'auto' | 'sentence-transformers' | 'hf' | 'flagembedding' (optional package)"},
    )
    pooling: str = field(
        default="auto",
        metadata={"description": "'auto' (read from the model folder) | 'cls' | 'mean'; used by the hf backend"},
    )
    query_instruction: str = field(
        default="", metadata={"description": "text prepended to queries when is_query=True (BGE v1.5 style)"}
    )
    device: str = field(default="auto", metadata={"description": "'auto' (cuda if visible) | 'cpu' | 'cuda[:N]'"})
    batch_size: int = field(default=32, metadata={"description": "texts per forward pass, > 0"})
    max_length: int = field(default=512, metadata={"description": "max tokens per text (longer ones truncated)"})
    cache_dir: str | None = field(default=None, metadata={"description": "Hugging Face cache folder for hub ids"})

    def __post_init__(self) -> None:
        if self.backend not in _BACKENDS:
            raise InvalidInputError(f"EmbedderConfig.backend must be one of {_BACKENDS}, got {self.backend!r}")
        if self.pooling not in _POOLINGS:
            raise InvalidInputError(f"EmbedderConfig.pooling must be one of {_POOLINGS}, got {self.pooling!r}")
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise InvalidInputError(f"EmbedderConfig.batch_size must be a positive int, got {self.batch_size!r}")
        if not isinstance(self.max_length, int) or self.max_length <= 0:
            raise InvalidInputError(f"EmbedderConfig.max_length must be a positive int, got {self.max_length!r}")
        if not isinstance(self.query_instruction, str):
            raise InvalidInputError("EmbedderConfig.query_instruction must be a str")


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str):
        raise InvalidInputError("texts must be a list of str, got a single str (wrap it in a list)")
    if not isinstance(texts, (list, tuple)):
        raise InvalidInputError(f"texts must be a list of str, got {type(texts).__name__}")
    if len(texts) == 0:
        raise InvalidInputError("texts is empty: nothing to embed")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidInputError(f"texts[{i}] must be a str, got {type(t).__name__}")
    return list(texts)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalization of a ``(n, dim)`` array, as float32; zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)  # (n, dim)
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (n, 1)
    return x / np.maximum(norms, 1e-12)  # (n, dim)


class Embedder(ABC):
    """Base class: validation, query instruction, batching and normalization; subclasses embed one batch.

    Attributes:
        dim: embedding size.
        query_instruction: prepended to each text when ``encode(..., is_query=True)``.
        batch_size: default batch size of :meth:`encode`.
    """

    dim: int
    query_instruction: str = ""
    batch_size: int = 32
    #: the longest input the model embeds, in its own tokens with special tokens (None: unknown); longer input is
    #: cut by the model, so chunks must fit :func:`max_chunk_tokens`
    max_tokens: int | None = None
    #: the model's own tokenizer (None when the backend hides it)
    tokenizer: Any = None
    #: the model name as configured (``EMBEDDED_EMBEDDER`` for the default); set by :func:`load_embedder`
    name: str | None = None

    def encode(self, texts: list[str], *, batch_size: int | None = None, is_query: bool = False) -> np.ndarray:
        """Embed texts.

        Args:
            texts: non-empty list of str (empty strings are allowed and embed like any text).
            batch_size: texts per forward pass; default the embedder's configured batch size.
            is_query: prepend the query instruction (if one is configured).

        Returns:
            ``(n, dim)`` float32, each row L2-normalized.

        Raises:
            InvalidInputError: ``texts`` is not a non-empty list of str, or ``batch_size <= 0``.
        """
        texts = _check_texts(texts)
        bs = self.batch_size if batch_size is None else batch_size
        if not isinstance(bs, int) or bs <= 0:
            raise InvalidInputError(f"batch_size must be a positive int, got {bs!r}")
        if is_query and self.query_instruction:
            texts = [self.query_instruction + t for t in texts]
        self._check_lengths(texts, refuse=False)
        parts = [self._embed_batch(texts[i : i + bs]) for i in range(0, len(texts), bs)]  # each (b, dim)
        out = l2_normalize(np.concatenate(parts, axis=0))  # (n, dim)
        if out.shape != (len(texts), self.dim):
            raise RuntimeError(f"embedder returned shape {out.shape}, expected {(len(texts), self.dim)}")
        return out

    def check_fits(self, texts: list[str]) -> None:
        """Refuse passages longer than the model embeds (InvalidInputError naming the first): an index must not
        hold chunks whose tail was never embedded (chunk them with :func:`max_chunk_tokens`)."""
        self._check_lengths(list(texts), refuse=True)

    def _check_lengths(self, texts: list[str], refuse: bool) -> None:
        """Never cut silently: with ``refuse`` a text longer than the model embeds raises; otherwise (queries,
        gists) it is embedded cut, with a warning."""
        limit = max_chunk_tokens(self) if self.tokenizer is not None else None
        if not limit or not texts or not all(isinstance(t, str) for t in texts):
            return  # nothing to check (bad input is named by the caller's validation)
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False, truncation=False,
                                                      verbose=False)["input_ids"]]
        over = [i for i, n in enumerate(lengths) if n > limit]
        if not over:
            return
        i = over[0]
        if refuse:
            raise InvalidInputError(
                f"{len(over)} text(s) exceed the {limit} tokens the embedder {self.name or ''} embeds (text {i}: "
                f"{lengths[i]} tokens); split them first (TokenChunker with chunk_size <= {limit})")
        logger.warning("%d text(s) exceed the embedder's %d tokens (text %d: %d tokens): only the first %d "
                       "tokens are embedded", len(over), limit, i, lengths[i], limit)

    @abstractmethod
    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        """Embed one batch: ``(b, dim)`` float (normalization is done by :meth:`encode`)."""


def _pooling_mode_of(module: Any) -> str | None:
    """The pooling mode of a sentence-transformers Pooling module, across library versions (for logging)."""
    mode = getattr(module, "pooling_mode", None)
    if isinstance(mode, str):
        return mode
    getter = getattr(module, "get_pooling_mode_str", None)
    return getter() if callable(getter) else None


class SentenceTransformerEmbedder(Embedder):
    """A sentence-transformers folder, with the pooling and normalization modules the folder declares.

    Args:
        path: a local sentence-transformers folder (or hub id in the HF cache).
        device: ``"auto"``, ``"cpu"``, ``"cuda[:N]"``.
        max_length: caps the folder's ``max_seq_length``.
        query_instruction, batch_size: see :class:`Embedder`.

    Raises:
        ModelNotFoundError: the folder cannot be loaded.
    """

    def __init__(self, path: str, *, device: str = "auto", max_length: int = 512, query_instruction: str = "",
                 batch_size: int = 32, cache_dir: str | None = None):
        from sentence_transformers import SentenceTransformer

        from memorag_core.models import pick_device

        self.device = pick_device(device)
        try:
            self.model = SentenceTransformer(str(path), device=self.device, cache_folder=cache_dir)
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"cannot load the sentence-transformers model {path!r}: {exc}") from exc
        if self.model.max_seq_length is None or self.model.max_seq_length > max_length:
            self.model.max_seq_length = max_length
        self.max_tokens = int(self.model.max_seq_length)
        self.tokenizer = getattr(self.model, "tokenizer", None)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        dim = get_dim()
        if dim is None:
            raise ModelNotFoundError(f"the sentence-transformers model {path!r} does not declare its dimension")
        self.dim = int(dim)
        self.query_instruction = query_instruction
        self.batch_size = batch_size
        modules = [type(m).__name__ for m in self.model]
        pooling = next((_pooling_mode_of(m) for m in self.model if type(m).__name__ == "Pooling"), None)
        logger.info("embedder %s: sentence-transformers backend, modules %s, pooling %s (from the folder), "
                    "dim %d, max_seq_length %d, device %s", path, modules, pooling, self.dim,
                    self.model.max_seq_length, self.device)
        self.pooling = pooling

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, batch_size=len(texts), convert_to_numpy=True,
                                 normalize_embeddings=False, show_progress_bar=False)  # (b, dim)


def _unsupported_st_modules(path: Path) -> list[str]:
    """sentence-transformers modules in ``path/modules.json`` other than Transformer, Pooling and Normalize."""
    modules_file = path / "modules.json"
    if not modules_file.exists():
        return []
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in json.loads(modules_file.read_text())]
    return [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]


def read_folder_pooling(path: str | Path) -> tuple[str | None, str]:
    """The pooling a model folder declares, and where it came from.

    Looks at ``1_Pooling/config.json`` (sentence-transformers; ``pooling_mode_cls_token`` /
    ``pooling_mode_mean_tokens``), then a ``"pooling"`` entry in ``config.json``.

    Returns:
        ``(pooling or None, source description)``.

    Raises:
        InvalidInputError: the folder declares a pooling other than cls or mean (max, last token, ...).
    """
    path = Path(path)
    st = path / "1_Pooling" / "config.json"
    if st.exists():
        cfg = json.loads(st.read_text())
        modes = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True]
        if modes == ["pooling_mode_cls_token"]:
            return "cls", str(st)
        if modes == ["pooling_mode_mean_tokens"]:
            return "mean", str(st)
        raise InvalidInputError(f"{st} declares pooling {modes}; the hf backend supports cls or mean only "
                                "(use backend='sentence-transformers' for other modes)")
    cfg_file = path / "config.json"
    if cfg_file.exists():
        value = json.loads(cfg_file.read_text()).get("pooling")
        if value is not None:
            if value not in ("cls", "mean"):
                raise InvalidInputError(f"{cfg_file} has pooling={value!r}; expected 'cls' or 'mean'")
            return value, f"{cfg_file} ('pooling' entry)"
    return None, "nothing in the folder"


class HFEmbedder(Embedder):
    """Plain transformers encoder with CLS or masked-mean pooling (BGE, BGE-M3 dense: CLS).

    ``embedding = normalize(pool(last_hidden_state))`` where ``cls`` takes position 0 and ``mean`` averages the
    non-padding positions.

    Args:
        path: a local model folder (or hub id in the HF cache) loadable with ``AutoModel``/``AutoTokenizer``.
        pooling: ``"auto"`` (from the folder, see :func:`read_folder_pooling`), ``"cls"`` or ``"mean"``.
        device, max_length, query_instruction, batch_size: see :class:`EmbedderConfig`.

    Raises:
        ModelNotFoundError: the folder cannot be loaded.
        InvalidInputError: ``pooling="auto"`` and the folder declares none, or an unsupported pooling.
    """

    def __init__(self, path: str, *, pooling: str = "auto", device: str = "auto", max_length: int = 512,
                 query_instruction: str = "", batch_size: int = 32, cache_dir: str | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        from memorag_core.models import pick_device

        if pooling not in _POOLINGS:
            raise InvalidInputError(f"pooling must be one of {_POOLINGS}, got {pooling!r}")
        local = Path(path)
        declared, source = read_folder_pooling(local) if local.is_dir() else (None, "not a local folder")
        extra = _unsupported_st_modules(local)
        if extra:
            raise InvalidInputError(
                f"{path!r} is a sentence-transformers folder with modules {extra} that the hf backend cannot apply "
                "(it only pools and normalizes); use backend='sentence-transformers'"
            )
        if pooling == "auto":
            if declared is None:
                raise InvalidInputError(
                    f"cannot decide the pooling of {path!r}: {source} declares it (no 1_Pooling/config.json, no "
                    "'pooling' in config.json); pass pooling='cls' (BGE) or 'mean'"
                )
            pooling, why = declared, f"read from {source}"
        elif declared is not None and declared != pooling:
            why = f"pooling= argument, overriding {declared!r} from {source}"
        else:
            why = "pooling= argument"
        self.pooling: Pooling = pooling  # type: ignore[assignment]
        self.device = pick_device(device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), cache_dir=cache_dir)
            self.model = AutoModel.from_pretrained(str(path), cache_dir=cache_dir, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"cannot load the embedding model {path!r}: {exc}") from exc
        self.model.to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)
        # The tokenizer's model_max_length is the usable length (XLM-R style models reserve positions for the
        # padding offset, so max_position_embeddings overstates it); HF uses a huge sentinel when it is unset.
        limit = getattr(self.tokenizer, "model_max_length", None)
        if not limit or limit > 1_000_000:
            limit = getattr(self.model.config, "max_position_embeddings", None) or max_length
        self.max_length = min(max_length, int(limit))
        self.max_tokens = self.max_length
        self.query_instruction = query_instruction
        self.batch_size = batch_size
        logger.info("embedder %s: hf backend, pooling %s (%s), dim %d, max_length %d, device %s",
                    path, self.pooling, why, self.dim, self.max_length, self.device)

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        import torch

        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state  # (b, seq, dim)
        if self.pooling == "cls":
            pooled = hidden[:, 0]  # (b, dim)
        else:
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, seq, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (b, dim)
        return pooled.float().cpu().numpy()  # (b, dim)


def require_flagembedding() -> None:
    """Import FlagEmbedding or raise OptionalDependencyError saying why and what to use instead."""
    try:
        import FlagEmbedding  # noqa: F401
    except Exception as exc:  # ImportError, or its own imports failing against transformers 5
        raise OptionalDependencyError(
            f"the 'flagembedding' embedder backend needs the package FlagEmbedding, which cannot be imported "
            f"here ({type(exc).__name__}: {exc}); FlagEmbedding 1.4.2 does not work with transformers 5.x. "
            "Use backend='hf' (CLS pooling) or 'sentence-transformers' for BGE / BGE-M3 dense vectors."
        ) from exc


class FlagEmbeddingEmbedder(Embedder):
    """The FlagEmbedding package's models (``FlagModel``, or ``BGEM3FlagModel`` for folders holding BGE-M3's
    ``colbert_linear.pt``/``sparse_linear.pt`` heads, of which the dense vectors are used).

    Raises:
        OptionalDependencyError: FlagEmbedding is not installed or does not import (1.4.2 fails with
            transformers 5.x); use backend ``"hf"`` (CLS pooling) or ``"sentence-transformers"`` instead, which
            give BGE's dense vectors.
        ModelNotFoundError: the model cannot be loaded.
    """

    def __init__(self, path: str, *, device: str = "auto", max_length: int = 512, query_instruction: str = "",
                 batch_size: int = 32, cache_dir: str | None = None):
        require_flagembedding()
        from FlagEmbedding import BGEM3FlagModel, FlagModel

        from memorag_core.models import pick_device

        self.device = pick_device(device)
        local = Path(path)
        is_m3 = local.is_dir() and (local / "colbert_linear.pt").exists() and (local / "sparse_linear.pt").exists()
        logger.info("embedder %s: flagembedding backend, %s (%s)", path, "BGEM3FlagModel" if is_m3 else "FlagModel",
                    "folder has colbert/sparse heads" if is_m3 else "no colbert/sparse heads in the folder")
        try:
            if is_m3:
                self.model = BGEM3FlagModel(str(path), use_fp16=False, devices=self.device)
            else:
                self.model = FlagModel(str(path), query_instruction_for_retrieval=None, use_fp16=False,
                                       devices=self.device)
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"cannot load the FlagEmbedding model {path!r}: {exc}") from exc
        self.is_m3 = is_m3
        self.max_length = max_length
        self.max_tokens = max_length
        self.tokenizer = getattr(self.model, "tokenizer", None)
        self.query_instruction = query_instruction
        self.batch_size = batch_size
        self.dim = int(self._embed_batch(["dimension probe"]).shape[1])

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        if self.is_m3:
            out = self.model.encode(texts, batch_size=len(texts), max_length=self.max_length)["dense_vecs"]
        else:
            out = self.model.encode(texts, batch_size=len(texts), max_length=self.max_length)
        return np.asarray(out, dtype=np.float32).reshape(len(texts), -1)  # (b, dim)


def max_chunk_tokens(embedder: Embedder) -> int | None:
    """The most content tokens (the embedder's own tokenizer, special tokens excluded) that ``embedder`` embeds
    without cutting: the chunk-size limit of a corpus embedded with it. None when the embedder does not say.

    all-MiniLM-L6-v2: 256 - 2 ([CLS], [SEP]) = 254.
    """
    if not embedder.max_tokens:
        return None
    tok = embedder.tokenizer
    special = tok.num_special_tokens_to_add(pair=False) if tok is not None and hasattr(
        tok, "num_special_tokens_to_add") else 2
    return int(embedder.max_tokens) - int(special)


def chunk_size_for(embedder: Embedder, requested: int | None) -> int:
    """The chunk size to use with ``embedder``: ``requested``, or the embedder's limit when None.

    Raises:
        InvalidInputError: ``requested`` exceeds what the embedder embeds (its tail would never be embedded).
    """
    limit = max_chunk_tokens(embedder)
    if requested is None:
        if limit is None:
            raise InvalidInputError("the embedder does not declare its input limit: pass a chunk size")
        return limit
    if limit is not None and requested > limit:
        raise InvalidInputError(
            f"chunk size {requested} exceeds what the embedder {getattr(embedder, 'name', None) or ''} embeds "
            f"({embedder.max_tokens} tokens, {limit} without special tokens): the rest of each chunk would never be "
            f"embedded; use a chunk size <= {limit} (or leave it unset to take the embedder's)")
    return requested


def _resolve_model_dir(name: str | None, cache_dir: str | None) -> str:
    """A local folder for ``name``: the embedded MiniLM, an existing folder, or a hub id already in the cache."""
    from memorag_core.models import resolve_embedder

    path = resolve_embedder(name)
    if Path(path).expanduser().is_dir():
        return str(Path(path).expanduser())
    if "/" in path and not path.startswith((".", "/", "~")) and path.count("/") == 1:
        try:
            from huggingface_hub import snapshot_download

            # Weights for other runtimes (ONNX, TF, Flax, OpenVINO) are not needed and can be gigabytes.
            return snapshot_download(path, cache_dir=cache_dir, ignore_patterns=[
                "onnx/*", "*.onnx", "openvino/*", "*.msgpack", "*.h5", "tf_model*", "flax_model*", "rust_model*"])
        except Exception as exc:  # offline, unknown repo, gated
            raise ModelNotFoundError(f"embedding model {name!r} is not a local folder and cannot be fetched from "
                                     f"the hub ({type(exc).__name__}: {exc})") from exc
    raise ModelNotFoundError(f"embedding model {name!r}: folder {path!r} does not exist")


def load_embedder(config: EmbedderConfig | str | None = None) -> Embedder:
    """Build an embedder from a config, a model name/folder, or ``None`` (the embedded all-MiniLM-L6-v2).

    Raises:
        ModelNotFoundError: the model cannot be found (its name is in the message).
        OptionalDependencyError: backend ``"flagembedding"`` without an importable FlagEmbedding.
        InvalidInputError: a bad config value, or an undecidable pooling for the hf backend.
    """
    if config is None or isinstance(config, str):
        config = EmbedderConfig(model=config)
    if not isinstance(config, EmbedderConfig):
        raise InvalidInputError(f"load_embedder takes an EmbedderConfig, a str or None, got {type(config).__name__}")
    if config.backend == "flagembedding":
        require_flagembedding()  # fail on the missing package before touching the hub
    path = _resolve_model_dir(config.model, config.cache_dir)
    backend = config.backend
    if backend == "auto":
        has_st = (Path(path) / "modules.json").exists()
        backend = "sentence-transformers" if has_st and config.pooling == "auto" else "hf"
        logger.info("embedder %s: backend auto -> %s (%s)", path, backend,
                    "modules.json present" if has_st else "no modules.json")
    common = dict(device=config.device, max_length=config.max_length, query_instruction=config.query_instruction,
                  batch_size=config.batch_size, cache_dir=config.cache_dir)
    emb = _build_embedder(config, path, backend, common)
    from memorag_core.models import EMBEDDED_EMBEDDER

    emb.name = config.model or EMBEDDED_EMBEDDER  # recorded in bundles and manifests; a mismatch is refused by name
    return emb


def _build_embedder(config: EmbedderConfig, path: str, backend: str, common: dict) -> Embedder:
    if backend == "sentence-transformers":
        if not (Path(path) / "modules.json").exists():
            # sentence-transformers would silently build mean pooling for a plain transformers folder.
            raise InvalidInputError(f"{config.model!r} ({path}) is not a sentence-transformers folder (no "
                                    "modules.json); use backend='hf' with pooling='cls' or 'mean'")
        if config.pooling != "auto":
            declared, source = read_folder_pooling(path)
            if declared != config.pooling:
                raise InvalidInputError(f"pooling={config.pooling!r} conflicts with {declared!r} from {source}; the "
                                        "sentence-transformers backend uses the folder's pooling (use backend='hf')")
        return SentenceTransformerEmbedder(path, **common)
    if backend == "hf":
        return HFEmbedder(path, pooling=config.pooling, **common)
    return FlagEmbeddingEmbedder(path, **common)
