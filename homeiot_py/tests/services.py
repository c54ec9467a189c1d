"""Real services for the tests: Mosquitto and influxd on free loopback ports in temp dirs.

Nothing here mocks them. Each server is started from the distribution's binary, owned by the
object that started it, and stopped by that object's PID only — never by name — so a user's own
Mosquitto or InfluxDB survives the test run. Under ``CI=true`` a missing binary is a failure.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import hashlib
import ipaddress
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from homeiot.core.passwords import hash_password, password_file_line

LOOPBACK = "127.0.0.1"
#: Loopback too, but never in a test certificate's SAN.
UNLISTED_LOOPBACK = "127.0.0.2"


def require_binary(name: str) -> str:
    """The path of ``name``; skips the test, or fails it under CI=true, when it is missing."""
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    message = f"{name} is not installed (run `make setup`)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def vm_hwm_mb(pid: int) -> float:
    """Peak RSS (VmHWM, MB) of a live process since its exec; 0 once it is gone. (``ru_maxrss`` of a
    forked child would also count the parent's pages from before the exec.)"""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {port} within {timeout_s} s:\n{log.read_text()}")


class ManagedProcess:
    """A server process started and stopped by the tests (by its own PID only)."""

    def __init__(self, argv: list[str], log: Path, port: int) -> None:
        self.argv = argv
        self.log = log
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        wait_for_port(self.port, self.proc, self.log)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


# --- TLS material ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A CA and a server certificate signed by it, as PEM files in a directory."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def make_pki(directory: Path, *, dns_names: tuple[str, ...] = ("localhost",),
             ips: tuple[str, ...] = (LOOPBACK,), prefix: str = "") -> Pki:
    """Generate a fresh CA and a server certificate with the given SANs (EC P-256)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{prefix}HomeIot test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(directory / f"{prefix}ca.crt", directory / f"{prefix}server.crt",
              directory / f"{prefix}server.key")
    pki.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(pki.server_key, server_key)
    return pki


# --- Mosquitto -------------------------------------------------------------------------------

#: The test users: the gateway reads everything under the base topic, each publisher writes
#: only its own source's topic.
BASE_TOPIC = "home/power"
#: The gateway's receipts (end-to-end acks): only it writes, each source reads its own.
RECEIPT_TOPIC = "homeiot/receipts"


@dataclass
class Mosquitto:
    """A real Mosquitto 2 with only a TLS listener, password file, ACL and persistence."""

    directory: Path
    pki: Pki
    port: int
    users: dict[str, str]
    #: A second TLS listener on 127.0.0.2, an address that is loopback but not in the SAN.
    unlisted_port: int = field(default_factory=free_port)
    process: ManagedProcess = field(init=False)

    def __post_init__(self) -> None:
        binary = require_binary("mosquitto")
        (self.directory / "data").mkdir(parents=True, exist_ok=True)
        passwords = self.directory / "passwords"
        passwords.write_text("".join(
            password_file_line(user, hash_password(pw)) + "\n" for user, pw in self.users.items()
        ))
        passwords.chmod(0o600)
        acl = self.acl
        self.write_acl()
        conf = self.directory / "mosquitto.conf"
        conf.write_text(
            # Started as root, Mosquitto would drop to user "mosquitto", which cannot read
            # pytest's private temp dir; stay whoever runs the tests.
            f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
            "per_listener_settings false\n"
            "allow_anonymous false\n"
            f"password_file {passwords}\n"
            f"acl_file {acl}\n"
            "persistence true\n"
            f"persistence_location {self.directory / 'data'}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 100000\n"
            "max_inflight_messages 0\n"
            "log_dest stdout\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
        )
        with conf.open("a") as out:
            for address, port in ((LOOPBACK, self.port), (UNLISTED_LOOPBACK, self.unlisted_port)):
                out.write(f"listener {port} {address}\n"
                          f"cafile {self.pki.ca_cert}\n"
                          f"certfile {self.pki.server_cert}\n"
                          f"keyfile {self.pki.server_key}\n"
                          "tls_version tlsv1.2\n")
        self.process = ManagedProcess([binary, "-c", str(conf)], self.directory / "mosquitto.log",
                                      self.port)

    @property
    def acl(self) -> Path:
        return self.directory / "aclfile"

    def write_acl(self, writes: dict[str, tuple[str, ...]] | None = None) -> None:
        """The ACL: the gateway reads everything under the base topic, each publisher writes only
        its own source's topic; ``writes`` replaces a user's writable sources."""
        sources = {"meter1": ("meter1",), "meter2": ("meter2",), **(writes or {})}
        # The same shape as roles/mosquitto/templates/aclfile.j2.
        text = f"user gateway\ntopic read {BASE_TOPIC}/#\ntopic write {RECEIPT_TOPIC}/#\n"
        for user, mine in sources.items():
            text += f"\nuser {user}\n" + "".join(f"topic write {BASE_TOPIC}/{s}\n"
                                                  f"topic read {RECEIPT_TOPIC}/{s}\n" for s in mine)
        self.acl.write_text(text)

    def set_password(self, user: str, password: str) -> None:
        """Change (or add) one identity's password in the password file; :meth:`reload` applies."""
        self.users = {**self.users, user: password}
        passwords = self.directory / "passwords"
        passwords.write_text("".join(
            password_file_line(u, hash_password(pw)) + "\n" for u, pw in self.users.items()))

    def reload(self) -> None:
        """SIGHUP to our broker's PID: it rereads the password file and the ACL."""
        assert self.process.proc is not None
        self.process.proc.send_signal(signal.SIGHUP)


def mosquitto_client_env(directory: Path, tool: str, user: str, password: str) -> dict[str, str]:
    """Environment for a Mosquitto C client (``tool``: mosquitto_pub or mosquitto_sub) whose
    credentials come from its options file ``$XDG_CONFIG_HOME/<tool>``, never the command line."""
    config = directory / f"xdg-{tool}-{user}"
    config.mkdir(parents=True, exist_ok=True)
    options = config / tool
    options.write_text(f"-u {user}\n-P {password}\n")
    options.chmod(0o600)
    return {**os.environ, "XDG_CONFIG_HOME": str(config)}


#: The dynamic-security administrator of a broker started with ``deny_subscribe``.
DYNSEC_ADMIN = ("dynsec-admin", "dynsec-admin-pass")


def dynamic_security_plugin() -> str:
    """The path of Mosquitto's dynamic-security plugin (Debian ships it with mosquitto)."""
    found = sorted(glob.glob("/usr/lib/*/mosquitto_dynamic_security.so")
                   + glob.glob("/usr/lib/mosquitto_dynamic_security.so"))
    if not found:
        message = "Mosquitto's dynamic-security plugin is not installed (run `make setup`)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found[0]


def start_mosquitto(directory: Path, pki: Pki, users: dict[str, str], *,
                    deny_subscribe: dict[str, tuple[str, ...]] | None = None) -> Mosquitto:
    """A running broker. ``deny_subscribe`` (user → topic filters) makes the broker refuse those
    users' SUBSCRIBEs to those filters with a SUBACK 0x87: Mosquitto 2.0's ``acl_file`` grants every
    SUBSCRIBE (it checks reads on delivery), so this uses its dynamic-security plugin, which
    decides for the users it lists (their other rights: the ACL file's shape) and defers every
    other user to the password file and ACL."""
    broker = Mosquitto(directory, pki, free_port(), users)
    if deny_subscribe:
        roles, clients = [], []
        for user, filters in deny_subscribe.items():
            mine = [f"{BASE_TOPIC}/{user}"] if user != "gateway" else []
            acls = [{"acltype": "publishClientSend", "topic": t, "allow": True} for t in mine]
            acls += [{"acltype": "publishClientSend", "topic": f"{RECEIPT_TOPIC}/#",
                      "allow": True}] if user == "gateway" else []
            acls += [{"acltype": "subscribePattern", "topic": t, "allow": False}
                     for t in filters]
            roles.append({"rolename": f"role-{user}", "acls": acls})
            salt = os.urandom(12)
            digest = hashlib.pbkdf2_hmac("sha512", users[user].encode(), salt, 101)
            clients.append({"username": user, "password": base64.b64encode(digest).decode(),
                            "salt": base64.b64encode(salt).decode(), "iterations": 101,
                            "roles": [{"rolename": f"role-{user}"}]})
        # An administrator that may change those rights at run time ($CONTROL, allow_subscribe).
        control = "$CONTROL/dynamic-security/#"
        roles.append({"rolename": "role-admin", "acls": [
            {"acltype": acltype, "topic": control, "allow": True}
            for acltype in ("publishClientSend", "publishClientReceive", "subscribePattern")]})
        salt = os.urandom(12)
        digest = hashlib.pbkdf2_hmac("sha512", DYNSEC_ADMIN[1].encode(), salt, 101)
        clients.append({"username": DYNSEC_ADMIN[0], "password": base64.b64encode(digest).decode(),
                        "salt": base64.b64encode(salt).decode(), "iterations": 101,
                        "roles": [{"rolename": "role-admin"}]})
        config = directory / "dynamic-security.json"
        config.write_text(json.dumps({
            "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": True,
                                 "subscribe": True, "unsubscribe": True},
            "clients": clients, "groups": [], "roles": roles}))
        config.chmod(0o600)
        conf = directory / "mosquitto.conf"
        conf.write_text(conf.read_text() + f"plugin {dynamic_security_plugin()}\n"
                        f"plugin_opt_config_file {config}\n")
    broker.process.start()
    return broker


# --- InfluxDB --------------------------------------------------------------------------------


@dataclass
class Influxd:
    """A real influxd 1.x on loopback with its data in a temp dir."""

    directory: Path
    port: int
    auth_enabled: bool = False
    max_body_size: int = 25_000_000
    process: ManagedProcess = field(init=False)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def __post_init__(self) -> None:
        binary = require_binary("influxd")
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        conf = d / "influxdb.conf"
        conf.write_text(
            "reporting-disabled = true\n"
            f'bind-address = "{LOOPBACK}:{free_port()}"\n'
            f'[meta]\n  dir = "{d / "meta"}"\n  logging-enabled = false\n'
            f'[data]\n  dir = "{d / "data"}"\n  wal-dir = "{d / "wal"}"\n'
            "  query-log-enabled = false\n  trace-logging-enabled = false\n"
            "[monitor]\n  store-enabled = false\n"
            "[subscriber]\n  enabled = false\n"
            "[continuous_queries]\n  enabled = false\n"
            f'[http]\n  bind-address = "{LOOPBACK}:{self.port}"\n'
            f"  auth-enabled = {'true' if self.auth_enabled else 'false'}\n"
            "  log-enabled = false\n  max-row-limit = 0\n"
            f"  max-body-size = {self.max_body_size}\n"
        )
        self.process = ManagedProcess([binary, "-config", str(conf)], d / "influxd.log", self.port)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/ping", timeout=1.0).status_code == 204:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"influxd not ready:\n{(self.directory / 'influxd.log').read_text()}")

    def admin(self, statement: str, auth: tuple[str, str] | None = None) -> None:
        """Run an administrative InfluxQL statement (POST /query), failing loudly."""
        response = httpx.post(f"{self.url}/query", data={"q": statement}, auth=auth, timeout=30.0)
        response.raise_for_status()
        body = response.json()
        for result in body.get("results", []):
            if "error" in result:
                raise RuntimeError(f"{statement}: {result['error']}")


def start_influxd(directory: Path, *, auth_enabled: bool = False,
                  max_body_size: int = 25_000_000) -> Influxd:
    server = Influxd(directory, free_port(), auth_enabled, max_body_size)
    server.process.start()
    server.wait_ready()
    return server


class CuttingRelay:
    """A loopback TCP relay to a real influxd that closes a connection after relaying ``limit``
    bytes of the answer (``limits``: per connection, in the order they are accepted; the last
    applies to the rest): InfluxDB's answer breaking off."""

    def __init__(self, target_port: int, *limits: int) -> None:
        self.limits = list(limits)
        self.target_port = target_port
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.cut = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            limit = self.limits.pop(0) if len(self.limits) > 1 else self.limits[0]
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, limit),
                             daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while data := source.recv(65536):
                if limit is not None and sent + len(data) >= limit:
                    sink.sendall(data[:limit - sent])
                    self.cut += 1
                    break
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for end in (source, sink):  # shutdown wakes the other direction's recv
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()

    def close(self) -> None:
        self._server.close()
