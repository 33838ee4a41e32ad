"""Shared pytest configuration. Fixtures live in tests/fixtures/, one module per area, loaded as plugins."""

import os

# Tests never touch the network: model hubs are unreachable here and must not be tried.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.s3",
    "tests.fixtures.ray_cluster",
    "tests.fixtures.collections",
]
