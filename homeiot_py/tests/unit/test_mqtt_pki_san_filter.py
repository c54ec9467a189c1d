"""The mqtt_pki role's SAN filter: names as DNS entries, addresses as IP entries, bad input named.

A broker reached by IP (the seed's alternative to a name) must carry that address as an IP SAN:
TLS clients compare an address only with IP entries, so ``DNS:192.168.1.10`` fails verification.
The end-to-end proof (a client verifying the certificate by IP against a real broker) is below.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
from ansible.errors import AnsibleFilterError

from tests.plugins import load_plugin
from tests.services import require_binary

plugin = load_plugin("roles/mqtt_pki/filter_plugins/mqtt_pki_san.py")
sans = plugin.mqtt_pki_subject_alt_names


def test_names_are_dns_and_addresses_are_ip() -> None:
    assert sans(["mqtt.home.test"], ["192.168.1.10"]) == ["DNS:mqtt.home.test", "IP:192.168.1.10"]


def test_an_address_among_the_names_becomes_an_ip_san() -> None:
    # group_vars derive the names from homeiot_mqtt_host, which may be the server's address.
    assert sans(["192.168.1.10"], []) == ["IP:192.168.1.10"]
    assert sans(["fd00::10", "Mqtt.Home.Test."], []) == ["DNS:mqtt.home.test", "IP:fd00::10"]


def test_duplicates_are_kept_once() -> None:
    assert sans(["192.168.1.10", "a.test"], ["192.168.1.10"]) == ["DNS:a.test", "IP:192.168.1.10"]


@pytest.mark.parametrize(
    ("names", "ips", "named"),
    [
        (["bad name"], [], "'bad name'"),
        (["-leading.test"], [], "'-leading.test'"),
        (["300.1.1.1"], [], "'300.1.1.1'"),
        ([], ["mqtt.home.test"], "'mqtt.home.test'"),
        ([], [], "at least one"),
    ],
)
def test_bad_entries_are_refused_by_name(names: list[str], ips: list[str], named: str) -> None:
    with pytest.raises(AnsibleFilterError, match=named):
        sans(names, ips)


def test_is_address() -> None:
    assert plugin.mqtt_pki_is_address("10.0.0.1")
    assert plugin.mqtt_pki_is_address("::1")
    assert not plugin.mqtt_pki_is_address("mqtt.home.test")


def test_a_client_verifies_the_certificate_by_ip(tmp_path: Path) -> None:
    """A certificate made from the filter's SANs passes Python's hostname check by IP (what paho
    does), and the old DNS-only form fails it: the regression this filter fixes."""
    openssl = require_binary("openssl")

    def issue(name: str, san: list[str]) -> Path:
        key, crt = tmp_path / f"{name}.key", tmp_path / f"{name}.crt"
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                        "-out", str(crt), "-subj", "/CN=broker", "-days", "1", "-extensions", "san",
                        "-config", "/dev/stdin"], input=f"[req]\ndistinguished_name=dn\n[dn]\n[san]\n"
                       f"subjectAltName={','.join(san)}\n", text=True, check=True, capture_output=True)
        return crt

    def verifies(crt: Path, host: str) -> bool:
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(crt, crt.with_suffix(".key"))
        client_ctx = ssl.create_default_context(cafile=str(crt))
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                    client_ctx.wrap_socket(raw, server_hostname=host):
                return True
        except ssl.SSLCertVerificationError:
            return False
        finally:
            thread.join(5)
            listener.close()

    fixed = issue("fixed", sans(["127.0.0.1"], []))
    old = issue("old", ["DNS:127.0.0.1"])
    assert verifies(fixed, "127.0.0.1")
    assert not verifies(old, "127.0.0.1")
