"""The live-version pointer of a collection (``collections/<name>/CURRENT``): read it, and replace it by
compare-and-swap (:class:`PointerMixin`, a part of :class:`~memorag_core.store.collection.CollectionStore`).

Why a conditional write on the pointer, not a lock object. Two publishers racing on one collection must not
both win. A lock object (create ``LOCK`` if absent, publish, delete it) needs a lease: a publisher that crashes
holding it blocks everyone until the lease expires, and a publisher that stalls past its lease (GC pause,
network partition) still goes on to write, so the lock does not actually fence it. A compare-and-swap on the
pointer itself has neither problem: the server applies ``PUT CURRENT If-Match: <etag read before>`` (or
``If-None-Match: *`` for a collection's first version) atomically and answers 412 Precondition Failed to the
loser, which raises :class:`PublishConflictError`; nothing is left to clean up but an unpublished version
folder that :meth:`CollectionStore.gc` removes later. AWS S3 supports both conditions on PutObject (since 2024),
as do MinIO and moto 5.2.5 (``moto/s3/responses.py: put_object`` checks ``If-Match`` and ``If-None-Match``),
and s3fs passes ``IfMatch`` through ``pipe_file(**kwargs)`` to PutObject and maps ``mode="create"`` to
``IfNoneMatch="*"``. On a local folder the same compare-and-swap runs under an exclusive ``fcntl.flock`` on
``collections/<name>/.publish.lock`` (held only for the read-compare-rename, released by the kernel if the
process dies, so it cannot go stale), with the pointer replaced by an atomic rename. Other fsspec backends are
readable but publishing to them is refused, since neither mechanism is available there.

A publish whose PUT succeeded but whose response was lost is retried; the retry then fails its precondition, so
on 412 the pointer is read again and the publish counts as won when it already names this version.
"""

from __future__ import annotations

import contextlib
import json
import os
from datetime import datetime, timezone

from memorag_core.errors import (
    ArtifactNotFoundError,
    CorruptArtifactError,
    InvalidInputError,
    PublishConflictError,
)
from memorag_core.store import fs as sfs
from memorag_core.store.names import check_collection


class PointerMixin:
    """``CURRENT`` of each collection: read (with its ETag) and compare-and-swap. Needs ``_p``, ``_u``, ``fs``,
    ``root`` and ``url`` of the store."""

    def current_pointer(self, collection: str) -> dict | None:
        """The live pointer, ``{"version": ..., "published_at": ISO-8601 UTC}``, or None if never published.
        Raises CorruptArtifactError for an unreadable pointer."""
        path = self._pointer_path(collection)
        try:
            data = sfs.with_retries(lambda: self.fs.cat_file(path), what=f"read {self._u(path)}")
        except ArtifactNotFoundError:
            self._check_bucket()
            return None
        try:
            pointer = json.loads(data)
            return {"version": str(pointer["version"]), "published_at": pointer.get("published_at")}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptArtifactError(f"{self._u(path)}: not a valid pointer ({exc})") from exc

    def _pointer_path(self, collection: str) -> str:
        return self._p("collections", check_collection(collection), "CURRENT")

    def _read_pointer(self, collection: str, *, with_etag: bool = False) -> tuple[str | None, str | None]:
        """(live version or None, S3 ETag of the pointer read or None). The ETag is read before the content, so
        a pointer replaced in between makes the later conditional write fail (conservative)."""
        path = self._pointer_path(collection)
        etag = None
        try:
            if with_etag:
                info = sfs.with_retries(lambda: self.fs.info(path, refresh=True), what=f"stat {self._u(path)}")
                etag = info.get("ETag")
            data = sfs.with_retries(lambda: self.fs.cat_file(path), what=f"read {self._u(path)}")
        except ArtifactNotFoundError:
            self._check_bucket()  # a missing bucket is an error, not an empty collection
            return None, None
        try:
            version = json.loads(data)["version"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptArtifactError(f"{self._u(path)}: not a valid pointer ({exc})") from exc
        return version, etag

    def _check_bucket(self) -> None:
        """Raise ArtifactNotFoundError naming the bucket if an S3 root's bucket does not exist."""
        if sfs.is_local(self.fs):
            return
        bucket = self.root.split("/", 1)[0]
        if not sfs.with_retries(lambda: self.fs.exists(bucket), what=f"stat bucket {bucket!r}"):
            raise ArtifactNotFoundError(f"store {self.url}: bucket {bucket!r} does not exist")

    @contextlib.contextmanager
    def _local_lock(self, collection: str):
        import fcntl

        path = self._p("collections", collection, ".publish.lock")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _swap_pointer(self, collection: str, new: str, expected: str | None) -> None:
        """Replace CURRENT with ``new`` iff it names ``expected`` now (None: iff there is none)."""
        path = self._pointer_path(collection)
        body = json.dumps({"version": new, "published_at": datetime.now(timezone.utc).isoformat()}).encode()

        def conflict(actual: str | None) -> PublishConflictError:
            return PublishConflictError(
                f"publish of {collection}/{new} at {self.url} lost: the live version is {actual!r}, expected "
                f"{expected!r} (another publisher won); version {new} stays unpublished")

        if sfs.is_local(self.fs):
            with self._local_lock(collection):
                actual, _ = self._read_pointer(collection)
                if actual != expected:
                    raise conflict(actual)
                sfs.write_atomic(self.fs, path, body)
            return
        if "s3" not in (self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)):
            raise InvalidInputError(f"publishing needs a local folder or S3 (conditional writes); {self.url} is neither")
        actual, etag = self._read_pointer(collection, with_etag=True)
        if actual != expected:
            raise conflict(actual)
        cond = {"IfMatch": etag} if etag is not None else {"mode": "create"}
        try:
            sfs.with_retries(lambda: self.fs.pipe_file(path, body, **cond), what=f"publish {self._u(path)}")
        except Exception as exc:  # noqa: BLE001 - a failed precondition is a lost race; others propagate
            if not _is_precondition_failure(exc):
                raise
            actual, _ = self._read_pointer(collection)
            if actual != new:  # not our own earlier attempt whose response was lost
                raise conflict(actual) from exc


def _is_precondition_failure(exc: BaseException) -> bool:
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, FileExistsError):
            return True
        response = getattr(e, "response", None)
        if isinstance(response, dict) and (response.get("Error", {}).get("Code") == "PreconditionFailed"
                                           or response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412):
            return True
        if "PreconditionFailed" in str(e) or "pre-conditions you specified did not hold" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False
