"""Names in the store: collection, unit and version ids (patterns, checks, new version ids)."""

from __future__ import annotations

import re
import secrets
from datetime import datetime, timezone

from memorag_core.errors import InvalidInputError

COLLECTION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
UNIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
VERSION_RE = re.compile(r"^(\d{8}T\d{6}\.\d{6})Z-[0-9a-f]{8}$")
_COLLECTION_RE, _UNIT_RE, _VERSION_RE = COLLECTION_RE, UNIT_RE, VERSION_RE


#: the pattern a collection name must match
COLLECTION_PATTERN = COLLECTION_RE.pattern


def is_collection_name(name: object) -> bool:
    """Whether ``name`` is a valid collection name (stays inside the store): :data:`COLLECTION_PATTERN`."""
    return isinstance(name, str) and bool(COLLECTION_RE.match(name))


def is_version_id(version: object) -> bool:
    """Whether ``version`` is a version id (e.g. ``20260101T120000.000000Z-1a2b3c4d``)."""
    return isinstance(version, str) and bool(VERSION_RE.match(version))


def check_collection(name: str) -> str:
    if not isinstance(name, str) or not COLLECTION_RE.match(name):
        raise InvalidInputError(f"collection name {name!r} must match {COLLECTION_RE.pattern}")
    return name


def check_unit(unit_id: str) -> str:
    if not isinstance(unit_id, str) or not UNIT_RE.match(unit_id):
        raise InvalidInputError(f"unit id {unit_id!r} must match {UNIT_RE.pattern}")
    return unit_id


def new_version_id(now: datetime | None = None) -> str:
    """A sortable, unique version id: ``20260101T120000.123456Z-1a2b3c4d``."""
    now = now or datetime.now(timezone.utc)
    return f"{now:%Y%m%dT%H%M%S.%f}Z-{secrets.token_hex(4)}"


def version_time(version: str) -> datetime | None:
    """The UTC creation time encoded in a version id, or None if it is not one."""
    m = VERSION_RE.match(version)
    return datetime.strptime(m.group(1), "%Y%m%dT%H%M%S.%f").replace(tzinfo=timezone.utc) if m else None
