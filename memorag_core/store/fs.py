"""Filesystem access for the artifact store: one fsspec filesystem per URL, retries, atomic writes, clear errors.

A store URL is a local path (``/data/store``, ``./store``), a ``file://`` URL, or ``s3://bucket/prefix`` (through
s3fs, an optional dependency). For S3, ``storage_options`` are passed to :class:`s3fs.S3FileSystem`
(``endpoint_url``, ``key``, ``secret``, ``config_kwargs`` ...); when no endpoint is given, the environment
variables ``MEMORAG_S3_ENDPOINT`` then ``AWS_ENDPOINT_URL`` are honoured so that CLI users can point at an
S3-compatible server.

Errors are translated once, here, into the classes of :mod:`memorag_core.errors`, each naming the object:
missing object or bucket -> :class:`ArtifactNotFoundError`; refused credentials -> :class:`StoreAccessError`;
a server that cannot be reached even after retries with backoff -> :class:`StoreUnavailableError`.
Only transient failures (connection refused/reset, timeouts, 5xx, throttling) are retried: a retry cannot fix
a missing object or a wrong key.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import secrets
import time
from typing import Any, Callable, TypeVar

import fsspec

from memorag_core.errors import (
    ArtifactError,
    ArtifactNotFoundError,
    InvalidInputError,
    OptionalDependencyError,
    StoreAccessError,
    StoreUnavailableError,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Exception class names (in the MRO or the cause chain) that mean "the transport failed, a retry may help".
# botocore and aiohttp are optional imports, so they are matched by name rather than imported.
_TRANSIENT_CLASS_NAMES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "HTTPClientError",
        "ClientConnectorError",
        "ServerDisconnectedError",
        "ClientOSError",
        "ClientPayloadError",
        "IncompleteReadError",
        "ResponseStreamingError",
        "ConnectionResetError",
        "ConnectionRefusedError",
        "BrokenPipeError",
        "TimeoutError",
    }
)
_TRANSIENT_ERRNOS = frozenset({errno.EAGAIN, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
                               errno.EPIPE, errno.ECONNABORTED})
_TRANSIENT_S3_CODES = frozenset({"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout",
                                 "RequestTimeTooSkewed", "500", "502", "503", "504"})
_ACCESS_S3_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
                              "ExpiredToken", "InvalidToken"})

# Defaults for s3fs: bounded timeouts and few transport-level retries, since :func:`with_retries` retries
# transient failures itself (retries multiply across layers otherwise).
_S3_DEFAULTS: dict[str, Any] = {
    "use_listings_cache": False,
    "retries": 2,
    "config_kwargs": {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 2, "mode": "standard"}},
}


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "s3" in protocol or "s3a" in protocol


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for fsspec's local filesystem (where atomic rename, file locks and memory maps are available)."""
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


def open_url(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve a store URL into ``(filesystem, path)``.

    Args:
        url: a local path, ``file://...`` or ``s3://bucket/prefix`` (any other fsspec protocol is passed through).
        storage_options: keyword arguments of the filesystem (for S3: ``endpoint_url``, ``key``, ``secret``,
            ``config_kwargs`` ...). For S3 without ``endpoint_url``, ``$MEMORAG_S3_ENDPOINT`` or
            ``$AWS_ENDPOINT_URL`` is used when set.

    Returns:
        The filesystem and the path inside it (no protocol, no trailing slash; absolute for local paths).

    Raises:
        InvalidInputError: empty URL, a URL naming no bucket or an unknown protocol. OptionalDependencyError:
        ``s3://`` without s3fs installed (or another protocol's package).
    """
    if not isinstance(url, str) or not url.strip():
        raise InvalidInputError(f"store URL must be a non-empty string, got {url!r}")
    options = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")):
        try:
            import s3fs
        except ImportError as exc:  # pragma: no cover - s3fs is installed in the test environment
            raise OptionalDependencyError(
                f"{url!r} needs the package 's3fs' (pip install 'memorag-ray[s3]')"
            ) from exc
        if "endpoint_url" not in options and "client_kwargs" not in options:
            endpoint = os.environ.get("MEMORAG_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                options["endpoint_url"] = endpoint
        merged = {k: v for k, v in _S3_DEFAULTS.items() if k != "config_kwargs"}
        merged["config_kwargs"] = {**_S3_DEFAULTS["config_kwargs"], **options.pop("config_kwargs", {})}
        merged.update(options)
        # s3fs's own retry count is a class attribute, not a constructor argument.
        transport_retries = int(merged.pop("retries"))
        fs = s3fs.S3FileSystem(**merged)
        fs.retries = transport_retries
        path = url.split("://", 1)[1].rstrip("/")
        if not path:
            raise InvalidInputError(f"S3 URL {url!r} names no bucket")
        return fs, path
    if "://" not in url:
        return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(url)).rstrip("/") or "/"
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ValueError as exc:  # fsspec: "Protocol not known: ..."
        raise InvalidInputError(f"store URL {url!r}: {exc} (use a local folder or s3://bucket/prefix)") from None
    except ImportError as exc:  # a known protocol whose package is not installed
        raise OptionalDependencyError(f"store URL {url!r} needs a package that is not installed ({exc})") from None
    return fs, path.rstrip("/") if len(path) > 1 else path


def join(*parts: str) -> str:
    """Join path parts with '/', ignoring empty parts (fsspec paths always use '/')."""
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p)


def url_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URL that names ``path`` in error messages and manifests (``s3://...`` or a local path)."""
    return f"s3://{path}" if _is_s3(fs) else path


def _error_code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {})
        code = err.get("Code")
        if code:
            return str(code)
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(status) if status else None
    return None


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_transient(exc: BaseException) -> bool:
    """True if ``exc`` (or an exception in its cause chain) is a transport failure that a retry may fix."""
    # memorag errors were classified already (a StoreUnavailableError has been retried: do not multiply retries).
    if isinstance(exc, (ArtifactError, FileNotFoundError, PermissionError, FileExistsError)):
        return False
    for e in _chain(exc):
        if isinstance(e, (ConnectionError, TimeoutError)) and not isinstance(e, ArtifactError):
            return True
        if any(cls.__name__ in _TRANSIENT_CLASS_NAMES for cls in type(e).__mro__):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        if _error_code(e) in _TRANSIENT_S3_CODES:
            return True
    return False


def translate_error(exc: BaseException, what: str) -> BaseException:
    """Map a filesystem/S3 exception to a memorag error whose message names ``what`` (the object or operation).

    memorag errors pass through unchanged. Unknown errors become :class:`ArtifactError` (chained).
    """
    if isinstance(exc, ArtifactError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return ArtifactNotFoundError(f"{what}: not found ({exc})")
    codes = {_error_code(e) for e in _chain(exc)}
    if isinstance(exc, PermissionError) or codes & _ACCESS_S3_CODES:
        return StoreAccessError(f"{what}: access refused, check the credentials and permissions ({exc})")
    if codes & {"NoSuchBucket", "NoSuchKey", "404"}:
        return ArtifactNotFoundError(f"{what}: not found ({exc})")
    if is_transient(exc):
        return StoreUnavailableError(f"{what}: store unreachable ({type(exc).__name__}: {exc})")
    return ArtifactError(f"{what}: {type(exc).__name__}: {exc}")


def with_retries(fn: Callable[[], T], *, what: str, attempts: int = 4, base_delay: float = 0.2,
                 max_delay: float = 5.0) -> T:
    """Call ``fn()``; retry transient failures with exponential backoff and jitter, translate the rest.

    Args:
        fn: the operation, with no arguments.
        what: names the object/operation in log lines and error messages (e.g. ``"read s3://b/x/manifest.json"``).
        attempts: total tries (>= 1). base_delay: seconds before the 2nd try; doubled each try, capped at
            ``max_delay``, times a random factor in [0.5, 1.5].

    Raises:
        StoreUnavailableError: still transient after ``attempts`` tries (the last error is chained).
        ArtifactNotFoundError / StoreAccessError / ArtifactError: at once, for errors a retry cannot fix.
    """
    if attempts < 1:
        raise InvalidInputError(f"attempts must be >= 1, got {attempts}")
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised translated
            if not is_transient(exc):
                raise translate_error(exc, what) from exc
            if attempt == attempts:
                raise StoreUnavailableError(
                    f"{what}: store unreachable after {attempts} attempts ({type(exc).__name__}: {exc})"
                ) from exc
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
            logger.warning("%s failed (%s: %s); retry %d/%d in %.2fs", what, type(exc).__name__, exc,
                           attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def modified_ts(info: dict) -> float | None:
    """The modification time (POSIX seconds) in an fsspec ``info``/``find(detail=True)`` entry: ``mtime`` for local
    files, ``LastModified`` for S3 objects; None when the backend gives neither (a "directory" entry)."""
    t = info.get("mtime")
    if t is not None:
        return float(t)
    t = info.get("LastModified") or info.get("last_modified")
    if t is None:
        return None
    if hasattr(t, "timestamp"):
        if getattr(t, "tzinfo", None) is None:
            from datetime import timezone

            t = t.replace(tzinfo=timezone.utc)
        return float(t.timestamp())
    return float(t)


def list_files(fs: fsspec.AbstractFileSystem, path: str, *, what: str) -> dict[str, dict]:
    """Every file under ``path`` (recursively) -> its info (size, time), in one listing per page (S3: a
    ``ListObjectsV2`` walk of 1,000 keys per request, not a request per file). Missing folder: ``{}``."""
    try:
        found = with_retries(lambda: fs.find(path, detail=True), what=what)
    except ArtifactNotFoundError:
        return {}
    return {p: i for p, i in found.items() if i.get("type", "file") == "file"}


def sha256_hex(data: bytes | memoryview) -> str:
    """Hex sha256 of a bytes-like object."""
    return hashlib.sha256(data).hexdigest()


def _with_local_temp(path: str, data: bytes, place: Callable[[str, str], T]) -> T:
    """Write ``data`` to a fsynced temporary file beside local ``path``, then ``place(tmp, path)`` it (rename or
    link); the temporary file never outlives the call."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{secrets.token_hex(6)}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return place(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes, *, attempts: int = 4) -> None:
    """Write ``data`` to ``path`` so that readers see the old object or the whole new one, never a part.

    Local: a temporary file in the same folder, fsync, then ``os.replace`` (atomic rename). S3: a single PUT or
    a multipart upload, both of which only become visible when complete. Transient failures are retried
    (re-uploading the whole object is idempotent).
    """
    what = f"write {url_of(fs, path)}"
    if is_local(fs):
        with_retries(lambda: _with_local_temp(path, data, os.replace), what=what, attempts=1)
        return
    with_retries(lambda: fs.pipe_file(path, data), what=what, attempts=attempts)


def write_if_absent(fs: fsspec.AbstractFileSystem, path: str, data: bytes, *, attempts: int = 4) -> bool:
    """Create ``path`` with ``data`` only if no object is there, atomically; True when this call created it.

    Local: a temporary file, fsync, then ``os.link`` to the final name (the kernel refuses an existing name, so of
    two racing writers exactly one wins, and a reader never sees a partial file). S3: a PUT with
    ``If-None-Match: *`` (s3fs ``mode="create"``), which the server answers 412 when the object exists. A retry
    after a lost response sees its own object and answers False.
    """
    what = f"create {url_of(fs, path)}"
    if is_local(fs):
        def _link(tmp: str, final: str) -> bool:
            try:
                os.link(tmp, final)
            except FileExistsError:
                return False
            return True
        return with_retries(lambda: _with_local_temp(path, data, _link), what=what, attempts=1)

    def _s3() -> bool:
        try:
            fs.pipe_file(path, data, mode="create")
        except Exception as exc:  # noqa: BLE001 - a failed precondition means the object exists
            if any(isinstance(e, FileExistsError) or _error_code(e) in ("PreconditionFailed", "412")
                   or "PreconditionFailed" in str(e) for e in _chain(exc)):
                return False
            raise
        return True
    return with_retries(_s3, what=what, attempts=attempts)


def read_all(fs: fsspec.AbstractFileSystem, path: str, *, attempts: int = 4,
             part_size: int = 32 * 2**20) -> bytearray:
    """Read a whole object into a writable buffer, checking that the byte count matches the listed size.

    Large S3 objects are fetched as concurrent ranged GETs of ``part_size`` bytes (much faster than one stream).

    Raises:
        ArtifactNotFoundError: missing. CorruptArtifactError: fewer bytes than listed (truncated in transit).
        StoreUnavailableError / StoreAccessError: see :func:`with_retries`.
    """
    from memorag_core.errors import CorruptArtifactError

    url = url_of(fs, path)
    size = int(with_retries(lambda: fs.info(path)["size"], what=f"stat {url}", attempts=attempts))
    if _is_s3(fs) and size > 2 * part_size:
        starts = list(range(0, size, part_size))
        ends = [min(s + part_size, size) for s in starts]
        parts = with_retries(lambda: fs.cat_ranges([path] * len(starts), starts, ends, on_error="raise"),
                             what=f"read {url}", attempts=attempts)
        buf = bytearray(size)
        for s, part in zip(starts, parts):
            if isinstance(part, BaseException):
                raise translate_error(part, f"read {url}")
            buf[s:s + len(part)] = part
        got = sum(len(p) for p in parts)
    else:
        data = with_retries(lambda: fs.cat_file(path), what=f"read {url}", attempts=attempts)
        buf = bytearray(data)
        got = len(buf)
    if got != size:
        raise CorruptArtifactError(f"{url}: read {got} bytes but the store lists {size} (truncated)")
    return buf
