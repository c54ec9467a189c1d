"""Mosquitto password files in the ``$7$`` format (PBKDF2-HMAC-SHA512), written by Ansible itself.

``mosquitto_password_file(users, existing)`` returns the file for ``users`` (name -> password),
keeping every hash in ``existing`` that still verifies against its password, so a re-run changes
nothing and only a changed password is re-hashed. The format is what Mosquitto 2.x's
``mosquitto_passwd`` writes: ``user:$7$<iterations>$<base64 12-byte salt>$<base64 64-byte digest>``.
It is the same algorithm as ``homeiot.core.passwords`` (a test holds the two together and checks
the output against a real Mosquitto).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

from ansible.errors import AnsibleFilterError

_SALT_BYTES = 12
_DIGEST_BYTES = 64


def _hash(password: str, iterations: int) -> str:
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _verifies(password: str, encoded: str) -> bool:
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


def mosquitto_password_file(users: dict[str, str], existing: str = "", iterations: int = 101) -> str:
    """The password file for ``users``, reusing the hashes in ``existing`` that still verify."""
    if not isinstance(users, dict):
        raise AnsibleFilterError("mosquitto_password_file expects a mapping of user name to password")
    if iterations < 1:
        raise AnsibleFilterError(f"mosquitto_password_file: iterations must be positive, got {iterations}")
    current = {}
    for line in (existing or "").splitlines():
        name, sep, encoded = line.partition(":")
        if sep:
            current[name] = encoded.strip()
    lines = []
    for name in sorted(users):
        password = users[name]
        if not name or any(c in name for c in ":\n\r#") or name != name.strip():
            raise AnsibleFilterError(f"MQTT user name {name!r} must be non-empty, without ':', '#', spaces or newlines")
        if not isinstance(password, str) or not password:
            raise AnsibleFilterError(f"MQTT user {name!r} has an empty password")
        kept = current.get(name, "")
        lines.append(f"{name}:{kept if _verifies(password, kept) else _hash(password, iterations)}")
    return "".join(line + "\n" for line in lines)


class FilterModule:
    """Ansible filter plugin entry point."""

    def filters(self) -> dict[str, object]:
        return {"mosquitto_password_file": mosquitto_password_file}
