"""Faults against a real S3 server process that the tests kill, restart and lock down."""

import threading
import time

import pytest

from memorag_core.errors import ArtifactError, ArtifactNotFoundError, StoreAccessError, StoreUnavailableError
from memorag_core.store.collection import CollectionStore
from memorag_core.store.memory_file import load_memory, save_memory
from memorag_core.store.schemas import Manifest
from tests.memorag_core.store.conftest import make_memory
from tests.memorag_core.store.test_collection import chunks_table, publish_version


def test_server_killed_during_publish_keeps_previous_version_live(moto_s3_server):
    server = moto_s3_server
    bucket = server.make_bucket()
    root = f"s3://{bucket}/store"
    store = CollectionStore(root, server.storage_options())
    v1 = publish_version(store, "c", "u1")

    w = store.new_version("c")
    w.write_table("chunks", "part-000", chunks_table("u-big"))
    big = make_memory(layers=8, heads=4, entries=(2000,), dim=64)  # ~33 MB fp32: a single upload in flight
    killer = threading.Timer(0.3, server.stop)
    killer.start()
    t0 = time.monotonic()
    with pytest.raises(ArtifactError) as ei:
        info = store.write_unit_memory("u-big", big)
        w.publish(Manifest(units={"u-big": info.to_dict()}))
    killer.join()
    elapsed = time.monotonic() - t0
    assert isinstance(ei.value, StoreUnavailableError), repr(ei.value)
    assert f"s3://{bucket}/store/" in str(ei.value)  # names the object being written
    assert elapsed < 30

    server.start()  # same port; replays what the killed server had acknowledged
    fresh = CollectionStore(root, server.storage_options())
    assert fresh.current_version("c") == v1
    r = fresh.open_version("c")
    assert r.read_table("chunks").column("unit_id").to_pylist() == ["u1"] * 3
    assert r.read_unit_memory("u1").header["model"] == "tiny"
    assert w.version not in fresh.list_versions("c")  # the interrupted version never got a manifest
    if fresh.has_unit("u-big"):  # if the upload completed before the kill, it is whole, never partial
        assert load_memory(fresh.unit_memory_url("u-big"), storage_options=server.storage_options()).keys[0].shape \
            == (4, 2000, 64)
    v3 = publish_version(fresh, "c", "u3")  # and publishing works again
    assert fresh.current_version("c") == v3


def test_wrong_credentials_then_unreachable_server(moto_s3_server, caplog):
    server = moto_s3_server
    bucket = server.make_bucket()
    root = f"s3://{bucket}/store"
    url = f"s3://{bucket}/m.safetensors"
    save_memory(make_memory(), url, storage_options=server.storage_options())
    publish_version(CollectionStore(root, server.storage_options()), "c", "u1")

    server.require_auth()  # from now on only real IAM keys are accepted; ours are not
    store = CollectionStore(root, server.storage_options(key="AKIAWRONG", secret="wrong"))
    t0 = time.monotonic()
    with pytest.raises(StoreAccessError, match=f"s3://{bucket}/store/collections/c/CURRENT.*credentials"):
        store.current_version("c")
    assert time.monotonic() - t0 < 5  # not retried: a retry cannot fix a wrong key
    assert not any("retry" in r.message for r in caplog.records)

    server.stop()
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=f"{url}.*after 4 attempts"):
        load_memory(url, storage_options=server.storage_options())
    assert time.monotonic() - t0 < 20
    assert sum("retry" in r.message for r in caplog.records) == 3  # backoff between the 4 attempts


def test_missing_bucket_is_named(moto_s3):
    opts = moto_s3.storage_options()
    store = CollectionStore("s3://no-such-bucket-xyz/root", opts)
    with pytest.raises(ArtifactNotFoundError, match="bucket 'no-such-bucket-xyz' does not exist"):
        store.current_version("c")
    with pytest.raises(ArtifactNotFoundError, match="s3://no-such-bucket-xyz/m.safetensors"):
        save_memory(make_memory(), "s3://no-such-bucket-xyz/m.safetensors", storage_options=opts)
    with pytest.raises(ArtifactNotFoundError, match="s3://no-such-bucket-xyz/m.safetensors"):
        load_memory("s3://no-such-bucket-xyz/m.safetensors", storage_options=opts)
