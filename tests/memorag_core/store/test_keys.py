"""API keys per collection: hashed at rest, shown once, verdicts ok / forbidden / unknown, revocation; local and
moto S3; the `memorag keys` commands."""

from __future__ import annotations

import json

import pytest

from jobs.cli import main
from memorag_core.errors import ArtifactNotFoundError, InvalidInputError
from memorag_core.store.keys import ApiKeyStore, parse_key


def _check_store(keys: ApiKeyStore) -> None:
    rec, key = keys.create("facts", label="ci")
    other_rec, other = keys.create("other")
    assert parse_key(key)[0] == rec.key_id and rec.collection == "facts"
    assert keys.check("facts", key) == "ok"
    assert keys.check("other", key) == "forbidden" and keys.check("facts", other) == "forbidden"
    assert keys.owner(key) == "facts" and keys.owner(other) == "other"
    tampered = key[:-2] + ("AA" if not key.endswith("AA") else "BB")
    for bad in (None, "", "nope", tampered, f"mrg_{'0' * 16}_{'x' * 43}"):
        assert keys.check("facts", bad) == "unknown"
    assert [r.key_id for r in keys.list("facts")] == [rec.key_id]
    keys.revoke("facts", rec.key_id)
    assert keys.check("facts", key) == "unknown" and keys.owner(key) is None
    with pytest.raises(ArtifactNotFoundError, match=rec.key_id):
        keys.revoke("facts", rec.key_id)
    assert keys.check("other", other) == "ok" and other_rec.label == ""


def test_keys_on_a_local_store_are_stored_hashed(tmp_path):
    keys = ApiKeyStore(str(tmp_path / "store"))
    _check_store(keys)
    rec, key = keys.create("facts")
    record = json.loads((tmp_path / "store" / "collections" / "facts" / "keys" / f"{rec.key_id}.json").read_text())
    assert key.split("_", 2)[2] not in json.dumps(record) and len(record["sha256"]) == 64 and record["salt"]
    with pytest.raises(InvalidInputError, match="collection name"):
        keys.create("../etc")
    with pytest.raises(InvalidInputError, match="key id"):
        keys.revoke("facts", "../../CURRENT")


def test_keys_on_moto_s3(moto_s3):
    bucket = moto_s3.make_bucket()
    _check_store(ApiKeyStore(f"s3://{bucket}/store", moto_s3.storage_options()))


def test_keys_cli_prints_the_key_once_and_revokes(tmp_path, capsys):
    store = str(tmp_path / "store")
    assert main(["keys", "create", "--store", store, "--collection", "facts", "--label", "me"]) == 0
    out = capsys.readouterr()
    key = out.out.strip()
    assert ApiKeyStore(store).check("facts", key) == "ok" and "key id" in out.err
    assert main(["keys", "list", "--store", store, "--collection", "facts"]) == 0
    assert parse_key(key)[0] in capsys.readouterr().out
    assert main(["keys", "revoke", key, "--store", store, "--collection", "facts"]) == 0
    assert ApiKeyStore(store).check("facts", key) == "unknown"
    assert main(["keys", "revoke", parse_key(key)[0], "--store", store, "--collection", "facts"]) == 2
