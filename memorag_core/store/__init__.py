"""The artifact store: schemas, memory files, bundles and versioned collections over fsspec (local or s3://).

See docs/store.md for the layout, the publish protocol and the fault behaviour.
"""

from memorag_core.store.bundle import Bundle
from memorag_core.store.collection import (
    CollectionStore,
    GCReport,
    JobLease,
    VersionFolder,
    VersionReader,
    VersionWriter,
)
from memorag_core.store.fs import open_url, with_retries
from memorag_core.store.memory_file import MemoryFileInfo, MemoryTensors, load_memory, save_memory
from memorag_core.store.schemas import (
    CHUNKS,
    DOCUMENTS,
    QUARANTINE,
    SCHEMA_VERSION,
    SUMMARIES,
    UNITS,
    Manifest,
    ModelRef,
    check_schema_version,
)

__all__ = [
    "Bundle", "CollectionStore", "GCReport", "JobLease", "VersionFolder", "VersionReader", "VersionWriter",
    "open_url", "with_retries",
    "MemoryFileInfo", "MemoryTensors", "load_memory", "save_memory", "CHUNKS", "DOCUMENTS", "QUARANTINE",
    "SCHEMA_VERSION", "SUMMARIES", "UNITS", "Manifest", "ModelRef", "check_schema_version",
]
