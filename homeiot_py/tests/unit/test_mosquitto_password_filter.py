"""The mosquitto role's password-file filter: Mosquitto's $7$ format, idempotent, strict input.

The role cannot import homeiot (it runs on any control node), so it carries its own copy of the
algorithm; these tests hold it to homeiot.core.passwords and to mosquitto_passwd itself. The
Molecule homeserver scenario then logs in with the file it writes against a real broker.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from ansible.errors import AnsibleFilterError

from homeiot.core.passwords import hash_password, verify_password
from tests.plugins import load_plugin
from tests.services import require_binary

plugin = load_plugin("roles/mosquitto/filter_plugins/mosquitto_passwd.py")
render = plugin.mosquitto_password_file


def _parse(content: str) -> dict[str, str]:
    return dict(line.split(":", 1) for line in content.splitlines())


def test_filter_is_registered_under_its_name() -> None:
    assert plugin.FilterModule().filters()["mosquitto_password_file"] is render


def test_new_file_hashes_verify_with_homeiot_core() -> None:
    users = {"gateway": "gateway-password-1", "meter1": "meter1-password-1"}
    content = render(users, "")
    assert content.endswith("\n")
    parsed = _parse(content)
    assert list(parsed) == ["gateway", "meter1"]
    for name, password in users.items():
        assert parsed[name].startswith("$7$101$")
        assert verify_password(password, parsed[name])
        assert not verify_password(password + "x", parsed[name])


def test_rerun_keeps_every_hash_that_still_verifies() -> None:
    users = {"gateway": "gateway-password-1", "meter1": "meter1-password-1"}
    first = render(users, "")
    assert render(users, first) == first


def test_changed_password_is_rehashed_and_others_kept() -> None:
    first = render({"gateway": "old-password-123", "meter1": "meter1-password-1"}, "")
    second = render({"gateway": "new-password-456", "meter1": "meter1-password-1"}, first)
    before, after = _parse(first), _parse(second)
    assert after["meter1"] == before["meter1"]
    assert after["gateway"] != before["gateway"]
    assert verify_password("new-password-456", after["gateway"])


def test_removed_user_disappears_and_garbage_is_replaced() -> None:
    existing = "gone:$7$101$AAAA$BBBB\nmeter1:not-a-hash\n# comment\n"
    parsed = _parse(render({"meter1": "meter1-password-1"}, existing))
    assert list(parsed) == ["meter1"]
    assert verify_password("meter1-password-1", parsed["meter1"])


def test_hash_made_by_homeiot_core_is_kept() -> None:
    encoded = hash_password("meter1-password-1")
    assert _parse(render({"meter1": "meter1-password-1"}, f"meter1:{encoded}\n"))["meter1"] == encoded


def test_hash_made_by_mosquitto_passwd_is_kept(tmp_path: Path) -> None:
    binary = require_binary("mosquitto_passwd")
    path = tmp_path / "passwords"
    # A throwaway test password; mosquitto_passwd only takes one in argv (-b).
    subprocess.run([binary, "-c", "-b", str(path), "meter1", "meter1-password-1"], check=True,
                   timeout=10, capture_output=True)
    existing = path.read_text()
    assert render({"meter1": "meter1-password-1"}, existing) == existing


@pytest.mark.parametrize(
    ("users", "message"),
    [
        ({"": "long-enough-password"}, "must be non-empty"),
        ({"a:b": "long-enough-password"}, "without ':'"),
        ({"a\nb": "long-enough-password"}, "newlines"),
        ({" meter1": "long-enough-password"}, "spaces"),
        ({"meter1": ""}, "empty password"),
        (["meter1"], "mapping"),
    ],
)
def test_bad_input_names_the_problem(users: object, message: str) -> None:
    with pytest.raises(AnsibleFilterError, match=message):
        render(users, "")


def test_iterations_must_be_positive() -> None:
    with pytest.raises(AnsibleFilterError, match="iterations"):
        render({"meter1": "meter1-password-1"}, "", 0)
