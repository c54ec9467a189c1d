"""Refuse secrets that must never be deployed: placeholders, weak values, malformed tokens.

``homeiot_secret_problems(secrets)`` takes ``{variable name: value}`` (values may be strings,
lists or dicts of strings, as in the vault) and returns one message per problem, each naming the
variable and never quoting the value. The playbooks' pre-task asserts the list is empty.

What is refused:
* a placeholder: any value of ``vault.yml.example`` (the repository's own list, kept in step by a
  unit test) or anything that reads like one (``change-me``, ``your-…``, ``paste-…``);
* a weak value: shorter than the variable's minimum, or fewer than 6 distinct characters;
* a Cloudflare tunnel token that is not one (base64 of JSON with ``a``, ``t`` and ``s``);
* B-route credentials of the wrong shape (ID: 32 letters/digits; password: 12).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterator
from typing import Any

from ansible.errors import AnsibleFilterError

#: Every value in inventory/home/group_vars/all/vault.yml.example (a test keeps them in step).
PLACEHOLDERS = frozenset({
    "paste-the-token-of-your-cloudflare-tunnel",
    "passphrase-that-encrypts-the-ca-key",
    "your-32-character-b-route-id",
    "your-12-character-b-route-password",
    "https://hooks.example.com/your-secret-path",
    "the-smtp-password",
    "a-long-random-password",
    "another-long-random-password",
    "a-long-random-token-of-at-least-32-characters",
    "a-long-random-api-token",
    "change-me",
})
_PLACEHOLDER_LIKE = re.compile(
    r"^(change[-_ ]?me|changeme|your[-_]|paste[-_]|a[-_]long[-_]random|example|placeholder|"
    r"password\d*$|secret\d*$|x{3,}$)", re.IGNORECASE)

#: Minimum length per variable (name prefix); machine-made secrets are 32 characters.
_MIN_LENGTH = {
    "vault_mqtt_ca_passphrase": 16,
    "vault_cloudflare_tunnel_token": 32,
    "vault_influxdb_admin_token": 32,
    "vault_api_tokens": 16,
    "vault_grafana_alert_webhook_url": 12,
}
_DEFAULT_MIN_LENGTH = 12
_SHAPED = {"vault_broute_id": re.compile(r"^[0-9A-Za-z]{32}$"),
           "vault_broute_password": re.compile(r"^[0-9A-Za-z]{12}$")}
_SHAPE_TEXT = {"vault_broute_id": "32 letters or digits (the B-route 認証ID)",
               "vault_broute_password": "12 letters or digits (the B-route password)"}


def _leaves(name: str, value: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(f"{name}[{key!r}]", item)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _leaves(f"{name}[{index}]", item)
    else:
        yield name, value


def _tunnel_token_ok(token: str) -> bool:
    try:
        data = json.loads(base64.b64decode(token + "=" * (-len(token) % 4), validate=True))
    except (binascii.Error, ValueError):
        return False
    return isinstance(data, dict) and all(isinstance(data.get(k), str) and data[k] for k in "ats")


def homeiot_secret_problems(secrets: dict[str, Any]) -> list[str]:
    """One message per refused secret, naming the variable (never the value)."""
    if not isinstance(secrets, dict):
        raise AnsibleFilterError("homeiot_secret_problems expects {variable name: value}")
    problems: list[str] = []
    for variable, tree in secrets.items():
        base = variable.split("[", 1)[0]
        for name, value in _leaves(variable, tree):
            if value is None or value == "":
                continue  # optional secrets; required ones are checked by their role
            text = str(value)
            if text in PLACEHOLDERS or _PLACEHOLDER_LIKE.match(text):
                problems.append(f"{name} still holds a placeholder: set a real value in the vault "
                                "(or delete it there to have a secret generated, for machine-made ones)")
                continue
            if base in _SHAPED:
                if not _SHAPED[base].match(text):
                    problems.append(f"{name} must be {_SHAPE_TEXT[base]}")
                continue
            if base == "vault_cloudflare_tunnel_token":
                if not _tunnel_token_ok(text):
                    problems.append(f"{name} is not a Cloudflare tunnel token (base64 of a JSON "
                                    "object with a, t and s): copy it from Zero Trust → Tunnels")
                continue
            minimum = _MIN_LENGTH.get(base, _DEFAULT_MIN_LENGTH)
            if len(text) < minimum:
                problems.append(f"{name} is too short ({len(text)} characters; at least {minimum})")
            elif len(set(text)) < 6:
                problems.append(f"{name} is too weak (fewer than 6 distinct characters)")
    return problems


class FilterModule:
    def filters(self) -> dict[str, object]:
        return {"homeiot_secret_problems": homeiot_secret_problems}
