"""Per-session tokens: the secret that lets one training job, and no other, touch its session.

``CreateSession`` issues a random token and returns it once; the service keeps only its SHA-256 digest (in
memory and in checkpoints), so neither logs nor state files reveal it. Every later call naming the session
must present the token; a missing one is ``Unauthenticated``, any other one ``PermissionDenied``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from crest.selector.v1 import codec
from selector_service.errors import PermissionDenied, Unauthenticated

METADATA_KEY = codec.SESSION_TOKEN_KEY  # the gRPC metadata entry that carries the token
_TOKEN_BYTES = 32  # 256 bits of randomness


def digest(token: str) -> str:
    """Hex SHA-256 of a token (what the service stores)."""
    return hashlib.sha256(token.encode()).hexdigest()


def issue() -> tuple[str, str]:
    """A fresh token and its digest."""
    token = secrets.token_urlsafe(_TOKEN_BYTES)
    return token, digest(token)


def verify(session_id: str, expected_digest: str, presented: str | None) -> None:
    """Raise unless ``presented`` is the token whose digest is ``expected_digest`` (constant-time compare)."""
    if not presented:
        raise Unauthenticated(
            f"session {session_id!r} needs its session token in the {METADATA_KEY!r} metadata entry "
            "(returned by CreateSession); the call carried none"
        )
    if not hmac.compare_digest(digest(presented), expected_digest):
        raise PermissionDenied(
            f"the {METADATA_KEY!r} metadata entry does not hold session {session_id!r}'s token "
            f"(received a {len(presented)}-character token that belongs to another session or to none)"
        )
