"""Typed configs of the memorize pipeline: one pydantic model per stage, one for the whole job.

Every field carries a description; configs are validated once, where the job starts (CLI flags, a JSON file, or
Python), and then passed to the stages as objects. ``MemorizeJobConfig.model_dump_json()`` is what the published
manifest records as the job's configuration.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from memorag_core.memory.config import MemoryConfig


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)


class CorpusConfig(_Config):
    """Where the documents are and how to read them."""

    url: str = Field(description="A JSONL file, a Parquet file, or a folder of .txt / .jsonl / .parquet files; "
                                 "a local path or an fsspec URL such as s3://bucket/corpus.")
    format: Literal["auto", "jsonl", "parquet", "text"] = Field(
        "auto", description="Input format; 'auto' picks it from the file extensions (.jsonl/.json, .parquet, .txt).")
    text_column: str = Field("text", description="Column (JSONL key) that holds the document text.")
    id_column: str | None = Field(
        "doc_id", description="Column that holds the document id. When a row lacks it (or this is None) the id is "
                              "derived from the path: '<relpath>' for text files, '<relpath>:<line>' for JSONL, "
                              "'<relpath>#<sha256(text)[:16]>' for Parquet.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec storage options for the corpus URL (e.g. endpoint_url, key).")


class ValidateConfig(_Config):
    """Which documents go to quarantine instead of memory."""

    max_chars: int = Field(2_000_000, gt=0, description="Documents longer than this many characters are "
                                                         "quarantined as over-long.")
    max_control_ratio: float = Field(0.05, ge=0.0, le=1.0, description="A document is binary when it holds a NUL "
                                     "byte or more than this fraction of control characters (tab/newline/CR aside).")


class PackConfig(_Config):
    """How documents are packed into memory units."""

    unit_tokens: int = Field(8192, gt=0, description="Most tokens (memory model's tokenizer) in one unit; small "
                                                     "documents are packed together up to this, a longer one is "
                                                     "split into pieces of at most this many tokens.")
    boundary_every: int = Field(8, gt=0, description="Content-defined packing: a unit also ends after any document "
                                "whose sha256(doc_id) is 0 modulo this. Adding or removing a document then changes "
                                "only the unit it falls in, not every later one.")
    separator: str = Field("\n\n", description="Text placed between packed documents inside a unit.")


class MemoryStageConfig(_Config):
    """The memory stage: actors that each hold one memory model."""

    memory: MemoryConfig = Field(default_factory=MemoryConfig,
                                 description="Memory kind, model and compression settings (memorag_core).")
    concurrency: int = Field(1, gt=0, description="Number of memory actors (one model each).")
    batch_size: int = Field(1, gt=0, description="Units handed to an actor per call.")
    units_per_forward: int = Field(1, gt=0, description=(
        "Units an actor memorizes together, one window of each per model forward (Memory.memorize_many; same "
        "memories as one at a time). 1 (default): one unit at a time. On a GPU, several short units fill the "
        "device better; takes effect only up to batch_size, the units one call hands the actor."))
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per memory actor (fractional in tests).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per memory actor: 1 on a GPU cluster, 0 on CPU.")
    storage_dtype: Literal["int8", "fp8", "keep"] = Field("int8", description=(
        "How unit memory files store K and V: 'int8' (default; per-channel then per-entry scales for keys, "
        "per-entry for values: answers equal to the unquantized memory's on the dev slice, docs/memory.md), "
        "'fp8' (float8_e4m3fn, same scales and size) or 'keep' (the model's dtype: 3.8x the bytes of int8 for "
        "fp32, 1.9x for bf16). Part of the unit id: units of another storage dtype are not reused."))
    max_tasks_in_flight: int = Field(1, gt=0, description=(
        "Batches queued on one memory actor at a time (Ray's max_tasks_in_flight_per_actor). 1 (default): an "
        "actor takes the next unit only when it is free, so units of uneven length cannot pile up behind a busy "
        "actor while another idles at the end of the stage; raise it only when unit reads dominate."))
    pin_cpus: bool = Field(False, description=(
        "CPU actors (num_gpus 0) pin themselves to max(1, num_cpus) cores of their own and use that many torch "
        "threads (pipeline.cpu_pin); nothing is pinned when the node has too few free cores. Measured +5-10% "
        "tokens/s per actor on 2 cores; leave off on nodes shared with other CPU-heavy work."))


class ChunkEmbedConfig(_Config):
    """The chunk + embed stage."""

    chunk_tokens: int = Field(512, gt=0, description="Most tokens (memory tokenizer) per retrieval chunk.")
    embedder: str | None = Field(None, description="Embedding model (folder or hub id); None = the embedded "
                                                   "all-MiniLM-L6-v2.")
    batch_size: int = Field(16, gt=0, description="Units handed to an embed actor per call.")
    encode_batch_size: int = Field(32, gt=0, description="Texts per embedder forward pass.")
    concurrency: int = Field(1, gt=0, description="Number of embed actors.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per embed actor.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per embed actor.")


class IndexStageConfig(_Config):
    """The FAISS index over chunk embeddings."""

    kind: Literal["flat", "ivf"] = Field("flat", description="Index kind (memorag_core.retrieval.IndexConfig).")
    metric: Literal["ip", "cosine", "l2"] = Field("ip", description="Similarity; embeddings are normalized, so "
                                                                    "'ip' is cosine.")
    nlist: int = Field(64, gt=0, description="IVF lists (ivf only); lowered to the training sample size.")
    nprobe: int = Field(8, gt=0, description="IVF lists probed per query (ivf only).")
    shards: int = Field(2, gt=0, description="Index shards, built in parallel; a chunk's shard is a hash of its "
                                             "unit id, so shards are stable across versions.")
    train_sample: int = Field(20_000, gt=0, description="Embeddings used to train the (shared) quantizer: the "
                                                        "ones with the smallest chunk ids, so it is deterministic.")
    merge: bool = Field(False, description="Also merge the shards into one index file (index/merged.faiss, "
                                           "in one Ray task). The query engine searches the shards and does not "
                                           "need it; a merged index is for consumers that want one file.")
    gpu: bool = Field(True, description="Train IVF and add to shards on the GPUs when the installed faiss "
                                        "(the 'faiss-gpu' extra) sees one; CPU otherwise.")


class RouterConfig(_Config):
    """Per-unit gists and the router index over them."""

    gist: Literal["summary", "cheap"] = Field(
        "summary", description="'summary': the memory model's summarize() writes each unit's gist right after "
                               "memorizing it (the memory is already in place); 'cheap': the first gist_chars "
                               "characters of the unit, no generation (for CPU runs and tests).")
    gist_chars: int = Field(1000, gt=0, description="Characters kept by the 'cheap' gist (and the cap on a "
                                                    "generated one).")
    gist_max_new_tokens: int = Field(128, gt=0, description="Token budget of a generated ('summary') gist.")


class MemorizeJobConfig(_Config):
    """Everything the memorize job needs: corpus, store, and one config per stage."""

    corpus: CorpusConfig = Field(description="Input documents.")
    store: str = Field(description="Store root: a local folder or an fsspec URL (s3://bucket/prefix).")
    collection: str = Field(description="Collection name to publish a new version of.")
    storage_options: dict[str, Any] = Field(default_factory=dict,
                                            description="fsspec storage options for the store root.")
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate",
                                      description="Quarantine rules.")
    pack: PackConfig = Field(default_factory=PackConfig, description="Packing into memory units.")
    memory_stage: MemoryStageConfig = Field(default_factory=MemoryStageConfig, description="Memory actors.")
    chunk_embed: ChunkEmbedConfig = Field(default_factory=ChunkEmbedConfig, description="Chunking and embedding.")
    index: IndexStageConfig = Field(default_factory=IndexStageConfig, description="FAISS index shards.")
    router: RouterConfig = Field(default_factory=RouterConfig, description="Unit gists and router.")
    ray_address: str | None = Field(None, description="Ray cluster to join ('auto', 'ray://...'); None starts "
                                                      "or joins a local Ray as ray.init() does.")
    num_cpus: int | None = Field(None, description="CPUs of a local Ray started by the job (None = all).")
    local_prepare_bytes: int = Field(
        16 * 2**20, ge=0, description="A corpus of at most this many bytes is read, validated and packed "
                                      "in the driver process (the same functions, so the "
                                      "same output) instead of as Ray Data tasks and shuffles, which cost more than "
                                      "the work on small corpora. Memory and embed actors run on Ray either way. "
                                      "0 always uses Ray Data.")
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, populate_by_name=True)

    @field_validator("collection")
    @classmethod
    def _collection_name(cls, v: str) -> str:
        import re

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", v):
            raise ValueError(f"collection name {v!r} must be 1-128 characters of letters, digits, '.', '_', '-'")
        return v

    @model_validator(mode="after")
    def _check(self) -> "MemorizeJobConfig":
        if self.chunk_embed.chunk_tokens > self.pack.unit_tokens:
            raise ValueError(f"chunk_embed.chunk_tokens ({self.chunk_embed.chunk_tokens}) must not exceed "
                             f"pack.unit_tokens ({self.pack.unit_tokens})")
        return self
