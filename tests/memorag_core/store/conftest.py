"""Store tests run the same cases on a local folder and on a real S3 server (moto on loopback)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import pytest
import torch

from memorag_core.store.memory_file import MemoryTensors


@dataclass
class Backend:
    """A store root to test against: ``root_url`` plus the ``storage_options`` it needs."""

    name: str
    root_url: str
    storage_options: dict | None

    def url(self, *parts: str) -> str:
        return "/".join([self.root_url, *parts])


@pytest.fixture(params=["local", "s3"])
def backend(request, tmp_path) -> Backend:
    """A fresh, empty store root: a temporary folder, or a fresh bucket on the session's moto server."""
    if request.param == "local":
        return Backend("local", str(tmp_path / "store"), None)
    server = request.getfixturevalue("moto_s3")
    bucket = server.make_bucket()
    return Backend("s3", f"s3://{bucket}/root-{secrets.token_hex(3)}", server.storage_options())


def make_memory(layers: int = 3, heads: int = 2, entries=(7, 9, 11), dim: int = 16, dtype=torch.float32,
                seed: int = 0) -> MemoryTensors:
    """A small memory with per-layer entry counts, an int64 extra tensor and a realistic header."""
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(heads, entries[i % len(entries)], dim, generator=g).to(dtype) for i in range(layers)]
    values = [torch.randn(heads, entries[i % len(entries)], dim, generator=g).to(dtype) for i in range(layers)]
    header = {"model": "tiny", "model_revision": "abc", "kind": "compressed_kv", "ratio": 4, "window": 32,
              "raw_tokens": 4 * sum(entries[:layers]), "entries": [k.shape[1] for k in keys],
              "positions": "compact", "next_position": 99, "dtype": str(dtype).removeprefix("torch."),
              "language": "en"}
    return MemoryTensors(keys=keys, values=values, header=header,
                         extra={"token_ids": torch.arange(50, dtype=torch.int64)})
