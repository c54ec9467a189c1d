"""Secrets no user has to invent, and secrets no user may deploy.

* ``inventory/home/group_vars/all/secrets.yml``: machine-made secrets generated on the control
  node on first use (0600 files in a 0700 directory), stable afterwards, one MQTT password per
  Pi under its source name, overridden by a value in vault.yml — run through real Ansible.
* ``playbooks/filter_plugins/homeiot_secrets.py``: every placeholder of vault.yml.example is
  refused, by variable name, without the value in the message.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.plugins import REPO, load_plugin

EXAMPLE = REPO / "inventory/home/group_vars/all/vault.yml.example"


plugin = load_plugin("playbooks/filter_plugins/homeiot_secrets.py")
problems = plugin.homeiot_secret_problems
GOOD = "q8ZtR2vXw9LmN4bKc7YpJ3sHd6FgTa1E"


def _example() -> dict[str, object]:
    text = EXAMPLE.read_text()
    # The optional secrets are commented out in the example; they are placeholders too.
    text += "".join(line.removeprefix("# ") + "\n" for line in text.splitlines()
                    if line.startswith("# vault_"))
    loaded = yaml.safe_load(text)
    assert isinstance(loaded, dict)
    return loaded


def _tunnel_token() -> str:
    body = {"a": "0123456789abcdef0123456789abcdef", "t": "6ff42ae2-765d-4adf-8112-31c55c1551ef",
            "s": base64.b64encode(b"x" * 32).decode()}
    return base64.b64encode(json.dumps(body).encode()).decode()


def test_every_placeholder_of_the_example_is_refused_by_name() -> None:
    example = _example()
    assert set(example) >= {"vault_cloudflare_tunnel_token", "vault_mqtt_ca_passphrase",
                            "vault_broute_id", "vault_broute_password"}
    for name, value in example.items():
        found = problems({name: value})
        assert found, f"{name}: its placeholder was accepted"
        assert all(name in message for message in found)
        assert all(str(value) not in message for message in found), "a value reached a message"


def test_the_plugin_knows_every_placeholder_of_the_example() -> None:
    assert {str(v) for v in _example().values()} <= plugin.PLACEHOLDERS


def test_real_looking_secrets_pass() -> None:
    assert problems({
        "vault_mqtt_ca_passphrase": GOOD, "vault_mqtt_gateway_password": GOOD,
        "vault_mqtt_publisher_passwords": {"meter1": GOOD, "meter2": GOOD[::-1]},
        "vault_api_tokens": [GOOD], "vault_cloudflare_tunnel_token": _tunnel_token(),
        "vault_broute_id": "0" * 16 + "ABCDEF0123456789", "vault_broute_password": "AB12CD34EF56",
        "vault_grafana_alert_webhook_url": "", "vault_influxdb_admin_token": "",
    }) == []


@pytest.mark.parametrize(
    ("secrets", "expected"),
    [
        ({"vault_mqtt_gateway_password": "short1"}, "too short"),
        ({"vault_mqtt_gateway_password": "aaaaaaaaaaaaaaaaab"}, "too weak"),
        ({"vault_mqtt_gateway_password": "change-me"}, "placeholder"),
        ({"vault_mqtt_gateway_password": "password1234"}, "placeholder"),
        ({"vault_mqtt_publisher_passwords": {"meter1": "another-long-random-password"}},
         "vault_mqtt_publisher_passwords['meter1']"),
        ({"vault_api_tokens": [GOOD, "abc"]}, "vault_api_tokens[1]"),
        ({"vault_cloudflare_tunnel_token": "abcdefghij" * 4}, "not a Cloudflare tunnel token"),
        ({"vault_cloudflare_tunnel_token": base64.b64encode(b'{"a": "1"}').decode() * 3},
         "not a Cloudflare tunnel token"),
        ({"vault_broute_id": "0123456789"}, "32 letters or digits"),
        ({"vault_broute_password": "AB12-CD34EF5"}, "12 letters or digits"),
    ],
)
def test_bad_secrets_are_named(secrets: dict[str, object], expected: str) -> None:
    found = problems(secrets)
    assert len(found) == 1
    assert expected in found[0]


def _ansible_var(inventory: Path, variable: str) -> object:
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_STDOUT_CALLBACK": "json",
           "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1", "ANSIBLE_FACT_CACHING": "memory"}
    ansible = shutil.which("ansible", path=str(Path(sys.executable).parent)) or "ansible"
    done = subprocess.run([ansible, "-i", str(inventory / "hosts.yml"), "server1", "-m",
                           "ansible.builtin.debug", "-a", f"var={variable}"],
                          capture_output=True, text=True, env=env, cwd=inventory, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    return result["plays"][0]["tasks"][0]["hosts"]["server1"][variable]


@pytest.fixture
def inventory(tmp_path: Path) -> Path:
    """The repository's inventory with one server and two Pis (one named by host_vars)."""
    target = tmp_path / "home"
    shutil.copytree(REPO / "inventory/home", target, ignore=shutil.ignore_patterns("secrets", "pki"))
    (target / "hosts.yml").write_text(
        "homeserver:\n  hosts:\n    server1: {}\nraspi:\n  hosts:\n    pi1: {}\n    pi2: {}\n")
    return target


def test_machine_secrets_are_generated_once_private_and_per_pi(inventory: Path) -> None:
    first = _ansible_var(inventory, "vault_mqtt_publisher_passwords")
    assert isinstance(first, dict)
    assert set(first) == {"meter1", "pi2"}  # pi1's source comes from its host_vars
    assert all(len(v) == 32 and v.isalnum() for v in first.values())
    assert first["meter1"] != first["pi2"]
    assert _ansible_var(inventory, "vault_mqtt_publisher_passwords") == first  # stable
    secrets = inventory / "secrets"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    files = sorted(p.name for p in secrets.iterdir())
    assert files == ["mqtt-meter1", "mqtt-pi2"]
    assert all(stat.S_IMODE((secrets / f).stat().st_mode) == 0o600 for f in files)
    token = _ansible_var(inventory, "vault_api_tokens")
    assert isinstance(token, list)
    assert problems({"vault_api_tokens": token, "vault_mqtt_publisher_passwords": first}) == []


def test_a_value_in_the_vault_overrides_the_generated_one(inventory: Path) -> None:
    (inventory / "group_vars/all/vault.yml").write_text(f"vault_mqtt_gateway_password: {GOOD}\n")
    assert _ansible_var(inventory, "vault_mqtt_gateway_password") == GOOD
    assert not (inventory / "secrets" / "mqtt-gateway").exists()
