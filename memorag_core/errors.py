"""Errors raised by memorag_core. Every message names the cause (the file, the argument, the model)."""


class MemoRAGError(Exception):
    """Base class of every error that memorag raises on purpose."""


class InvalidInputError(MemoRAGError, ValueError):
    """Bad user input: empty text, undecodable bytes, an over-long query, a bad config value."""


class ModelNotFoundError(MemoRAGError, FileNotFoundError):
    """A model named by path or hub id cannot be found or loaded offline."""


class MemoryNotReadyError(MemoRAGError, RuntimeError):
    """A query was made before any text was memorized or loaded."""


class ArtifactError(MemoRAGError):
    """An artifact (memory file, manifest, table, index) is missing, corrupt or of an unknown schema."""


class ArtifactNotFoundError(ArtifactError, FileNotFoundError):
    """An artifact that should exist is missing."""


class CorruptArtifactError(ArtifactError):
    """An artifact exists but is truncated, fails its checksum, or does not parse."""


class SchemaVersionError(ArtifactError):
    """An artifact was written by a newer schema version than this code understands."""


class OptionalDependencyError(MemoRAGError, ImportError):
    """An optional engine (vLLM, FlagEmbedding, openai, ray, s3fs) is needed but cannot be imported."""


class StoreAccessError(ArtifactError, PermissionError):
    """The store refused access: wrong or missing credentials, or no permission on the bucket or object."""


class StoreUnavailableError(ArtifactError, ConnectionError):
    """The store could not be reached (connection refused or dropped, timeouts) even after retries with backoff."""


class PublishConflictError(ArtifactError):
    """Another publisher replaced a collection's live pointer first; this publish lost and changed nothing live."""


class GeneratorEndpointError(MemoRAGError, RuntimeError):
    """An HTTP generation endpoint failed: unreachable, an error status, or a malformed answer.

    Attributes: ``endpoint`` (the URL called), ``status`` (HTTP status, None when no response came back),
    ``attempts`` (how many requests were made, retries included).
    """

    def __init__(self, message: str, *, endpoint: str, status: int | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.status = status
        self.attempts = attempts


class PayloadTooLargeError(InvalidInputError):
    """An input is over a size limit (a chat history, a body): HTTP 413 rather than 422."""


class UnsupportedModelError(MemoRAGError, ValueError):
    """A model whose attention or position scheme a KV memory cannot handle correctly (attention sinks, logit
    softcapping, sliding-window layers shorter than the memory, no rotary embedding to re-rotate kept keys).
    Raised when the memory is built (or, for limits that depend on the memory's size, before it would be
    exceeded); the message names what is missing."""


class QuotaExceededError(MemoRAGError):
    """An owner is over a quota (sessions, stored bytes): HTTP 429 with type ``insufficient_quota``; the message
    names the quota and how to free room."""


class HeadSetMismatchError(ArtifactError):
    """An attention head set (re-ranking) was chosen for another model's architecture, names heads the model does
    not have, or none ships for the model: choose heads for it with ``python -m jobs.select_heads``."""


def read_json_object(source, what: str, *, inline: bool = False) -> dict:
    """The JSON object of a settings file (``--config``, ``--plan``, ...), or of ``source`` itself when ``inline``
    and it opens with ``{``. Raises InvalidInputError naming ``what`` and the cause (unreadable file, bad JSON, not
    an object): the one reader of every JSON settings argument."""
    import json
    from pathlib import Path

    text_given = inline and str(source).lstrip().startswith("{")
    try:
        value = json.loads(str(source) if text_given else Path(source).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{what}: cannot read a JSON object ({exc})") from None
    if not isinstance(value, dict):
        raise InvalidInputError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value
