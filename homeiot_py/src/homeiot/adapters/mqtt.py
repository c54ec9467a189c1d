"""MQTT adapter over paho-mqtt 2.x: MQTT v5, TLS with CA verification and host-name checks.

This module only builds and connects clients; the publisher and the gateway own their loops.
Connection failures become ``homeiot`` errors that say what to do: :class:`MqttTlsError` and
:class:`MqttAuthError` (fix the configuration), :class:`MqttConnectionError` (retry later).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from typing import Any, cast

import paho.mqtt.client as mqtt
from paho.mqtt.client import CallbackOnConnect_v2
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from homeiot.config import MqttSettings
from homeiot.core.errors import MqttAuthError, MqttConnectionError, MqttTlsError

logger = logging.getLogger(__name__)

#: MQTT v5 CONNACK reason codes that mean "your identity or rights", not "try again later".
AUTH_REASONS = frozenset({134, 135, 138, 140})  # bad user/password, not authorized, banned, auth


class _ClosingSSLSocket(ssl.SSLSocket):
    """An SSL socket that closes itself when its handshake fails.

    paho creates the TLS socket inside ``connect()`` and drops it unclosed when the handshake
    raises (a wrong CA, a name not in the SAN), leaking a file descriptor per attempt.
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


#: OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH.
_NAME_MISMATCH = frozenset({62, 64})


def diagnose(settings: MqttSettings, timeout_s: float = 5.0) -> str:  # noqa: PLR0911 - one answer per step
    """Why connecting to the broker fails, in words an operator can act on.

    paho's background connect only says that it failed. This repeats the steps it takes — name
    lookup, TCP connect, TLS handshake with our context — and reports the first that fails and
    why. It never names the password (it does not use it).
    """
    host, port = settings.host, settings.port
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"cannot resolve the broker's name {host!r}: {exc.strerror or exc}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except ConnectionRefusedError:
        return (f"the connection to {host}:{port} was refused: no broker listens there (is it "
                "running, is the port right?)")
    except TimeoutError:
        return f"no answer from {host}:{port} within {timeout_s:.0f} s (a firewall, a wrong address?)"
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc.strerror or exc}"
    try:
        with tls_context(str(settings.ca_cert)).wrap_socket(sock, server_hostname=host):
            pass
    except ssl.SSLCertVerificationError as exc:
        if exc.verify_code in _NAME_MISMATCH:
            return (f"TLS: {host!r} is not in the broker certificate's SAN ({exc.verify_message}); "
                    "connect by a name or IP the certificate lists, or reissue it with this one")
        return (f"TLS: the broker's certificate was refused ({exc.verify_message}); check that "
                "MQTT_TLS_CA_CERT is the CA that signed it")
    except ssl.SSLError as exc:
        return f"TLS handshake with {host}:{port} failed: {exc.reason or exc}"
    except OSError as exc:
        return f"TLS handshake with {host}:{port} failed: {exc.strerror or exc}"
    finally:
        sock.close()
    return f"TCP and TLS to {host}:{port} work, but the MQTT connection failed"


def refusal(reason: ReasonCode) -> str:
    """A CONNACK refusal in words."""
    if reason.value in AUTH_REASONS:
        return (f"the broker refused our credentials ({reason}); check the user and password in "
                "MQTT_BROKER_URL (or MQTT_USER/MQTT_PASSWORD) and the broker's password file")
    return f"the broker refused the connection: {reason}"


class ConnectionReport:
    """Logs a connection problem at ERROR once per change of reason, and the recovery at INFO."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        self._log = log
        self._what = what
        self.problem: str | None = None

    def failed(self, reason: str) -> None:
        if reason != self.problem:
            self._log.error("%s: cannot connect to the broker: %s; retrying", self._what, reason)
            self.problem = reason

    def connected(self) -> None:
        if self.problem is not None:
            self._log.info("%s: connected to the broker again", self._what)
        self.problem = None


class _QuietPaho(logging.Filter):
    """paho logs "Client is not connected" at ERROR on every retry; we report the reason once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Client is not connected" not in record.getMessage()


def tls_context(ca_cert: str) -> ssl.SSLContext:
    """A client TLS context that trusts only ``ca_cert``, checks host names, and speaks TLS ≥ 1.2."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_cert)
    context.sslsocket_class = _ClosingSSLSocket
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def create_client(
    settings: MqttSettings,
    *,
    client_id: str | None = None,
    manual_ack: bool = False,
    userdata: Any = None,
) -> mqtt.Client:
    """A paho client (callback API v2, MQTT v5) with TLS and credentials from ``settings``.

    ``client_id`` overrides ``settings.client_id``; a persistent session needs a fixed one.
    """
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id or settings.client_id or "",
        protocol=mqtt.MQTTv5,
        userdata=userdata,
        manual_ack=manual_ack,
    )
    client.tls_set_context(tls_context(str(settings.ca_cert)))
    client.username_pw_set(settings.username, settings.password)
    client.reconnect_delay_set(min_delay=1, max_delay=10)
    paho_logger = logging.getLogger("paho")
    if not any(isinstance(f, _QuietPaho) for f in paho_logger.filters):
        paho_logger.addFilter(_QuietPaho())
    client.enable_logger(paho_logger)
    return client


def connect_properties(session_expiry_s: int, receive_maximum: int | None = None) -> Properties:
    """CONNECT properties: keep our session for ``session_expiry_s``; with ``receive_maximum``,
    the broker sends at most that many unacknowledged QoS 1 messages at a time (flow control
    that bounds a consumer's memory: the backlog stays in the broker)."""
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = session_expiry_s
    if receive_maximum is not None:
        properties.ReceiveMaximum = receive_maximum
    return properties


def connect(
    client: mqtt.Client,
    settings: MqttSettings,
    *,
    clean_start: bool,
    session_expiry_s: int | None = None,
    receive_maximum: int | None = None,
) -> None:
    """Open the TCP/TLS connection and send CONNECT; the CONNACK arrives in the client's loop.

    With ``clean_start=False`` and a session expiry, the broker keeps our subscriptions and queues
    QoS 1 messages while we are away.
    """
    expiry = settings.session_expiry_s if session_expiry_s is None else session_expiry_s
    try:
        client.connect(
            settings.host,
            settings.port,
            keepalive=settings.keepalive_s,
            clean_start=clean_start,
            properties=connect_properties(expiry, receive_maximum),
        )
    except ssl.SSLCertVerificationError as exc:
        raise MqttTlsError(
            f"TLS: the broker's certificate for {settings.host!r} was refused ({exc.verify_message});"
            f" check MQTT_TLS_CA_CERT and that the host name or IP is in the certificate's SAN"
        ) from exc
    except ssl.SSLError as exc:
        raise MqttTlsError(f"TLS handshake with {settings.host}:{settings.port} failed: {exc}") from exc
    except (TimeoutError, OSError) as exc:
        raise MqttConnectionError(
            f"cannot reach the MQTT broker at {settings.host}:{settings.port}: {exc}"
        ) from exc


def start(client: mqtt.Client, timeout_s: float = 10.0) -> None:
    """Start the client's network thread and wait until the broker accepted the connection.

    Call after :func:`connect`. Raises :class:`MqttAuthError` when the broker refuses our identity
    and :class:`MqttConnectionError` when the connection fails or no CONNACK arrives within
    ``timeout_s``; in both cases the client is closed again. On success the thread keeps running
    (and reconnects by itself) until :func:`close`.
    """
    # Our clients all use callback API v2 (create_client), so a user callback has the v2 shape.
    previous = cast("CallbackOnConnect_v2 | None", client.on_connect)
    outcome: list[ReasonCode] = []
    arrived = threading.Event()

    def on_connect(c: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                   properties: Any) -> None:
        outcome.append(reason)
        arrived.set()
        if previous is not None:
            previous(c, userdata, flags, reason, properties)

    client.on_connect = on_connect
    client.loop_start()
    try:
        if not arrived.wait(timeout_s):
            close(client)
            raise MqttConnectionError(f"no CONNACK from the broker within {timeout_s} s")
    finally:
        client.on_connect = previous
    reason = outcome[0]
    if reason.is_failure:
        close(client)
        if reason.value in AUTH_REASONS:
            raise MqttAuthError(f"the broker refused the connection: {reason}")
        raise MqttConnectionError(f"the broker refused the connection: {reason}")


def close(client: mqtt.Client) -> None:
    """Disconnect, stop the network thread and release every socket the client holds."""
    client.disconnect()
    client.loop_stop()
    # paho keeps an internal socket pair (and the broker socket after a refused CONNECT) open
    # until garbage collection; its only closing routine is private.
    client._reset_sockets()
