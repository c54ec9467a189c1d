"""The mosquitto role's start script against Debian's real Mosquitto: a corrupt mosquitto.db (a
power cut mid-save) is moved aside, logged, and the broker starts empty; a sound one is kept."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
from pathlib import Path

import pytest

from tests.services import LOOPBACK, free_port, require_binary, wait_for_port

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).parents[3] / "roles/mosquitto/templates/start-mosquitto.sh.j2"


def _start(tmp_path: Path, data: Path) -> tuple[subprocess.Popen[bytes], Path, int]:
    require_binary("mosquitto")
    script = tmp_path / "start-mosquitto.sh"
    script.write_text(SCRIPT.read_text().replace("{{ ansible_managed | comment }}", "# test"))
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"user {pwd.getpwuid(os.getuid()).pw_name}\npersistence true\n"
                    f"persistence_location {data}/\nlistener {port} {LOOPBACK}\n"
                    "allow_anonymous true\nlog_dest stderr\n")
    log = tmp_path / "start.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(["/bin/sh", str(script)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "MOSQUITTO_CONF": str(conf),
                                     "MOSQUITTO_DATA": str(data)})
    wait_for_port(port, proc, log, timeout_s=30)
    return proc, log, port


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)  # the script exec'd Mosquitto: this is the broker's PID
    proc.wait(15)


def test_a_corrupt_persistence_file_is_moved_aside(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "mosquitto.db").write_bytes(b"MQTT_DB\x00 half a file, the rest lost to a power cut")
    proc, log, _ = _start(tmp_path, data)
    try:
        [aside] = data.glob("mosquitto.db.corrupt-*")
        assert aside.read_bytes().startswith(b"MQTT_DB")
        text = log.read_text()
        assert "the persistence file could not be read (Unable to restore persistent database." \
            in text
        assert f"moved it to {aside}" in text
    finally:
        _stop(proc)
    assert (data / "mosquitto.db").exists()  # the new broker saved its own on the way out


def test_a_sound_persistence_file_is_kept(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    proc, _, _ = _start(tmp_path, data)
    _stop(proc)  # writes a sound, empty mosquitto.db
    sound = (data / "mosquitto.db").read_bytes()
    proc, log, _ = _start(tmp_path, data)
    _stop(proc)
    assert list(data.glob("mosquitto.db.corrupt-*")) == []
    assert "could not be read" not in log.read_text()
    assert (data / "mosquitto.db").read_bytes()[:15] == sound[:15]
