import errno

import pytest

from memorag_core.errors import ArtifactNotFoundError, InvalidInputError, StoreUnavailableError
from memorag_core.store import fs as sfs


def test_open_url_local_and_file_scheme(tmp_path):
    fs, path = sfs.open_url(str(tmp_path / "a" / ""))
    assert sfs.is_local(fs) and path == str(tmp_path / "a")
    fs2, path2 = sfs.open_url(f"file://{tmp_path}/b")
    assert sfs.is_local(fs2) and path2.endswith("/b")
    with pytest.raises(InvalidInputError):
        sfs.open_url("")


def test_open_url_refuses_an_unknown_protocol_naming_the_url():
    with pytest.raises(InvalidInputError, match="store URL 'nosuch://bucket/x': Protocol not known: nosuch"):
        sfs.open_url("nosuch://bucket/x")


def test_open_url_s3_honours_env_endpoint(monkeypatch):
    monkeypatch.setenv("MEMORAG_S3_ENDPOINT", "http://127.0.0.1:1")
    fs, path = sfs.open_url("s3://bucket/prefix/", {"key": "k", "secret": "s"})
    assert path == "bucket/prefix"
    assert fs.endpoint_url == "http://127.0.0.1:1"
    with pytest.raises(InvalidInputError, match="names no bucket"):
        sfs.open_url("s3://")


def test_with_retries_retries_transient_then_succeeds():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError(errno.ECONNRESET, "reset by peer")
        return "ok"

    assert sfs.with_retries(flaky, what="op", attempts=4, base_delay=0.01) == "ok"
    assert len(calls) == 3


def test_with_retries_gives_up_naming_the_object():
    calls = []

    def down():
        calls.append(1)
        raise ConnectionRefusedError(errno.ECONNREFUSED, "refused")

    with pytest.raises(StoreUnavailableError, match="read s3://b/x: store unreachable after 3 attempts"):
        sfs.with_retries(down, what="read s3://b/x", attempts=3, base_delay=0.01)
    assert len(calls) == 3


def test_with_retries_does_not_retry_missing_objects():
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("nope")

    with pytest.raises(ArtifactNotFoundError, match="read /x"):
        sfs.with_retries(missing, what="read /x", attempts=4, base_delay=0.01)
    assert len(calls) == 1


def test_write_atomic_leaves_no_temp_files(tmp_path):
    fs, path = sfs.open_url(str(tmp_path))
    sfs.write_atomic(fs, f"{path}/d/x.bin", b"one")
    sfs.write_atomic(fs, f"{path}/d/x.bin", b"two")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["x.bin"]
    assert bytes(sfs.read_all(fs, f"{path}/d/x.bin")) == b"two"
