"""Our $7$ hashes and Mosquitto's agree in both directions."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from homeiot.adapters.mqtt import close, connect, create_client, start
from homeiot.core.passwords import verify_password
from tests.conftest import USERS, mqtt_settings
from tests.services import Mosquitto, require_binary

pytestmark = pytest.mark.integration


def test_mosquitto_accepts_our_hashes(mosquitto: Mosquitto) -> None:
    # The session broker's password file was written by homeiot.core.passwords only.
    for user in USERS:
        settings = mqtt_settings(mosquitto, user)
        client = create_client(settings)
        connect(client, settings, clean_start=True)
        start(client)
        close(client)


@pytest.mark.parametrize("password", ["s3cret", "päss wörd:with/odd@chars", "x" * 200])
def test_hashes_made_by_mosquitto_passwd_verify(tmp_path: Path, password: str) -> None:
    binary = require_binary("mosquitto_passwd")
    path = tmp_path / "passwords"
    subprocess.run([binary, "-c", "-b", str(path), "alice", password], check=True, timeout=10,
                   capture_output=True)
    user, encoded = path.read_text().strip().split(":", 1)
    assert user == "alice"
    assert encoded.startswith("$7$")
    assert verify_password(password, encoded)
    assert not verify_password(password + "x", encoded)
