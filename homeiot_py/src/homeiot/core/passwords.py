"""Mosquitto password hashes in the ``$7$`` format (PBKDF2-HMAC-SHA512), as Mosquitto 2.x writes.

``$7$<iterations>$<base64 salt>$<base64 digest>`` with a 12-byte salt, a 64-byte digest and, by
default, Mosquitto's 101 iterations. We write the password file ourselves so provisioning needs no
``mosquitto_passwd`` container and a re-run keeps every hash that still verifies.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

from homeiot.core.errors import InvalidDataError

ITERATIONS = 101
SALT_BYTES = 12
_DIGEST_BYTES = 64


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    """Hash ``password`` for a Mosquitto password file. A random salt is drawn when none is given."""
    if not password:
        raise InvalidDataError("an MQTT password must not be empty")
    if iterations < 1:
        raise InvalidDataError(f"iterations must be positive, got {iterations}")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """True when ``encoded`` (a ``$7$`` hash) is a hash of ``password``; False for anything else."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except binascii.Error:
        return False
    iterations = int(parts[2])
    if len(expected) != _DIGEST_BYTES or not 1 <= iterations <= 10_000_000:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return hmac.compare_digest(digest, expected)


def password_file_line(username: str, encoded: str) -> str:
    """One ``user:hash`` line; usernames may not contain ':' or line breaks."""
    if not username or any(c in username for c in ":\n\r"):
        raise InvalidDataError(f"MQTT username {username!r} must be non-empty without ':' or newlines")
    return f"{username}:{encoded}"
