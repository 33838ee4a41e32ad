"""API keys at the ingress (pipeline/serve/auth.py) against a real local store, no Ray: bad keys cost no store
reads, known keys survive a store outage, revocation and rotation, the token bucket, error-message scrubbing."""

from __future__ import annotations

import secrets
import time

import pytest

from memorag_core.store.keys import ApiKeyStore
from pipeline.serve.auth import KeyGate, RateLimiter


class CountingKeys(ApiKeyStore):
    """The real key store, counting its store calls."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.calls = 0
        self.down = False

    def index(self):
        self.calls += 1
        if self.down:
            from memorag_core.errors import StoreUnavailableError

            raise StoreUnavailableError("list s3://bucket/x: store unreachable")
        return super().index()

    def read_record(self, collection, key_id):
        self.calls += 1
        if self.down:
            from memorag_core.errors import StoreUnavailableError

            raise StoreUnavailableError("read s3://bucket/x: store unreachable")
        return super().read_record(collection, key_id)


def random_key() -> str:
    return f"mrg_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"


def test_a_flood_of_random_keys_costs_no_store_reads_after_one_listing(tmp_path):
    keys = CountingKeys(str(tmp_path / "store"))
    rec, key = keys.create("facts", tenant="acme")
    gate = KeyGate(keys, cache_s=5.0, index_refresh_s=60.0)
    ident = gate.identify(key)
    assert ident.collection == "facts" and ident.tenant == "acme" and ident.key_id == rec.key_id
    before = keys.calls
    bad = [random_key() for _ in range(2000)]
    assert all(gate.refused(k) for k in bad)  # decided in the event loop: no thread, no store call
    assert all(gate.identify(k) is None for k in bad[:50])
    assert keys.calls == before
    # a wrong secret for a real key id: one record read at most (cached), then refused from the cache
    wrong = f"mrg_{rec.key_id}_{secrets.token_urlsafe(32)}"
    assert gate.identify(wrong) is None and gate.refused(wrong)
    assert keys.calls == before


def test_new_keys_are_seen_after_the_index_refresh_and_revoked_ones_after_the_cache(tmp_path):
    keys = CountingKeys(str(tmp_path / "store"))
    gate = KeyGate(keys, cache_s=0.2, index_refresh_s=0.2)
    assert gate.identify(random_key()) is None
    rec, key = keys.create("facts")
    time.sleep(0.25)
    assert not gate.refused(key) and gate.identify(key).tenant == rec.key_id  # default tenant: the key id
    keys.revoke("facts", rec.key_id)
    time.sleep(0.25)
    assert gate.identify(key) is None


def test_known_keys_keep_working_while_the_store_is_down(tmp_path):
    keys = CountingKeys(str(tmp_path / "store"))
    _, key = keys.create("facts")
    gate = KeyGate(keys, cache_s=0.1, index_refresh_s=0.1)
    assert gate.identify(key) is not None
    keys.down = True
    time.sleep(0.15)
    assert gate.identify(key).collection == "facts"
    assert gate.identify(random_key()) is None


def test_rotation_keeps_the_tenant(tmp_path):
    from memorag_core.query.sessions import tenant_owner

    keys = ApiKeyStore(str(tmp_path / "store"))
    old, old_key = keys.create("facts", tenant="acme")
    keys.revoke("facts", old.key_id)
    _, new_key = keys.create("facts", tenant="acme")
    gate = KeyGate(keys, cache_s=0.0, index_refresh_s=0.0)
    assert gate.identify(old_key) is None
    ident = gate.identify(new_key)
    assert tenant_owner(ident.tenant, "facts") == tenant_owner("acme", "facts") != tenant_owner("acme", "other")
    assert [r.tenant for r in keys.list("facts")] == ["acme"]
    from memorag_core.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="tenant"):
        keys.create("facts", tenant="../x")


def test_token_bucket_per_key():
    rl = RateLimiter(rate=2.0, burst=3)
    assert [rl.take("a") for _ in range(3)] == [None] * 3
    wait = rl.take("a")
    assert wait is not None and 0 < wait <= 0.5
    assert rl.take("b") is None  # another key has its own bucket
    time.sleep(0.55)
    assert rl.take("a") is None
    assert RateLimiter(rate=0, burst=1).take("a") is None  # 0: off


def test_error_messages_never_show_store_urls_or_paths():
    from memorag_core.errors import ArtifactNotFoundError, CorruptArtifactError
    from pipeline.serve.http import to_api_error

    e = to_api_error(ArtifactNotFoundError("collection 'x' has no version: s3://bucket/store/collections/x/CURRENT"))
    assert e.status == 404 and "s3://" not in e.message and "bucket" not in e.message and "'x'" in e.message
    e = to_api_error(CorruptArtifactError("/srv/memorag/store/collections/x/versions/v/manifest.json: bad header"))
    assert e.status == 500 and "/srv" not in e.message and "bad header" in e.message
