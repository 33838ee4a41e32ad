"""Ids and owners of conversation memories: checks, owner tokens, and the opaque names used in store paths and logs.

An **owner** is the SHA-256 hex token that scopes sessions and user memories. With API keys it comes from the
key's **tenant** (:func:`tenant_owner`; recorded with the key, see :mod:`memorag_core.store.keys`), so a rotated key
of the same tenant reaches the same memories; without keys, from the collection (:func:`owner_of`). User ids
(often e-mail addresses) never appear in store paths or logs: paths use :func:`user_key`, logs :func:`user_tag`.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Any

from memorag_core.errors import InvalidInputError

_ID_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_OWNER_RE = re.compile(r"^[0-9a-f]{64}$")


def check_session_id(session_id: Any) -> str:
    """``session_id`` if it is 8-64 characters of ``[A-Za-z0-9_-]``; else InvalidInputError naming the rule."""
    if not isinstance(session_id, str) or not _ID_RE.match(session_id):
        raise InvalidInputError(f"session id {session_id!r} must be 8-64 characters of letters, digits, '_' or '-'")
    return session_id


def check_user_id(user_id: Any) -> str:
    """``user_id`` if it is 1-64 characters of ``[A-Za-z0-9_.@-]`` starting with a letter or digit."""
    if not isinstance(user_id, str) or not _USER_RE.match(user_id):
        shown = repr(user_id) if not isinstance(user_id, str) else f"of {len(user_id)} characters"
        raise InvalidInputError(f"user id {shown} must be 1-64 characters of letters, digits, '_', '.', '@' "
                                "or '-', starting with a letter or digit")
    return user_id


def check_owner(owner: Any) -> str:
    """``owner`` if it is a SHA-256 hex token (see :func:`owner_of`, :func:`tenant_owner`)."""
    if not isinstance(owner, str) or not _OWNER_RE.match(owner):
        raise InvalidInputError("owner must be a SHA-256 hex digest (see owner_of / tenant_owner)")
    return owner


def owner_of(api_key: str | None, collection: str) -> str:
    """The owner token of a caller identified by the API key itself (SHA-256, never stored in clear); without
    authentication (``api_key`` None), of the collection name, so that even then one collection's sessions stay
    its own. The Serve app uses :func:`tenant_owner` for keys, which survives key rotation."""
    raw = f"key:{api_key}" if api_key else f"anonymous:{collection}"
    return hashlib.sha256(raw.encode()).hexdigest()


def tenant_owner(tenant: str, collection: str) -> str:
    """The owner token of a tenant's memories in ``collection``: every key of the tenant (a rotated one too)
    reaches them; another tenant, or the same tenant's key of another collection, does not."""
    return hashlib.sha256(f"tenant:{tenant}\x00{collection}".encode()).hexdigest()


def user_key(owner: str, user_id: str) -> str:
    """The store name of ``owner``'s user ``user_id`` (32 hex characters: the user id is not in any path)."""
    return hashlib.sha256(f"{owner}\x00{check_user_id(user_id)}".encode()).hexdigest()[:32]


def user_tag(user_id: str | None) -> str:
    """How logs name a user: ``u:`` and 10 hex characters of a hash (never the id, often an e-mail address)."""
    if user_id is None:
        return "-"
    return "u:" + hashlib.sha256(f"memorag-user\x00{user_id}".encode()).hexdigest()[:10]


def new_session_id() -> str:
    """A fresh random session id (22 url-safe characters, 128 bits)."""
    return secrets.token_urlsafe(16)
