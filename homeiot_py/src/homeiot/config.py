"""Settings, loaded once from the environment at start-up into frozen objects.

The seed's variable names keep their meaning (``MQTT_BROKER_URL``, ``MQTT_TLS_CA_CERT``,
``MQTT_TOPIC``, ``SOURCE_DEFAULT`` …); every variable is listed in ``docs/configuration.md``.
A bad value raises one :class:`ConfigError` naming the variable. An empty value counts as unset
(Docker Compose passes unset ``.env`` entries as empty strings). Secrets never appear in messages
or ``repr``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import SplitResult, unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from homeiot.core.errors import ConfigError, EncodingError, TopicError
from homeiot.core.lineprotocol import DEFAULT_MEASUREMENT, escape_measurement
from homeiot.core.link import LinkPolicy, LinkTiming
from homeiot.core.reading import validate_source
from homeiot.core.receipts import DEFAULT_RECEIPT_TOPIC, validate_receipt_root
from homeiot.core.topics import subscription_filter, validate_base_topic

Env = Mapping[str, str]
InfluxAuth = Literal["none", "password", "token"]

DEFAULT_CA_CERT = "/etc/ssl/certs/homeiot-ca.crt"
DEFAULT_TOPIC = "home/power"
DEFAULT_SOURCE = "meter1"
DEFAULT_MQTT_PORT = 8883
DEFAULT_SESSION_EXPIRY_S = 7 * 24 * 3600
DEFAULT_INFLUX_URL = "http://influxdb:8086"
DEFAULT_INFLUX_DB = "homeiot"


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """Where and as whom to connect to the broker (always TLS, always authenticated)."""

    host: str
    port: int
    username: str
    password: str = field(repr=False)
    ca_cert: Path
    topic: str
    client_id: str | None = None
    keepalive_s: int = 60
    session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S
    #: Root of the gateway's receipts (end-to-end acks): ``{receipt_topic}/{source}``.
    receipt_topic: str = DEFAULT_RECEIPT_TOPIC


@dataclass(frozen=True, slots=True)
class InfluxSettings:
    """How to reach InfluxDB's v1 compatibility API (InfluxDB 1.x, 2.x and 3 alike)."""

    url: str
    database: str
    retention_policy: str | None = None
    auth: InfluxAuth = "none"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    measurement: str = DEFAULT_MEASUREMENT
    timeout_s: float = 10.0


def _get(env: Env, name: str) -> str | None:
    value = env.get(name)
    return value if value else None


def _int(env: Env, name: str, default: int, low: int, high: int) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = int(raw.strip(), 10)
    except ValueError:
        raise ConfigError(name, f"must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(name, f"must be between {low} and {high}, got {value}")
    return value


def _float(env: Env, name: str, default: float, low: float, high: float) -> float:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(name, f"must be a number, got {raw!r}") from None
    if not low <= value <= high:  # also false for NaN
        raise ConfigError(name, f"must be between {low} and {high}, got {raw!r}")
    return value


def _redacted(raw: str) -> str:
    """``raw`` fit for an error message: whatever precedes the last ``@`` after the scheme (user
    and password, whatever characters they hold, encoded or not) and any query or fragment (which
    may carry ``?u=…&p=…``) become ``***``."""
    scheme, sep, rest = raw.partition("://")
    if not sep:
        scheme, rest = "", raw
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    for mark in "?#":
        if mark in rest:
            rest = rest.split(mark, 1)[0] + mark + "***"
    # "user:pass#word" without an "@" looks like host:port to a URL parser; a "port" that is not
    # a number may be the start of a password, so the whole host part goes.
    host_end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    host_port = rest[:host_end]
    if not host_port.startswith(("[", "***@")) and ":" in host_port and \
            not host_port.rsplit(":", 1)[1].isdigit():
        rest = "***" + rest[host_end:]
    return f"{scheme}{sep}{rest}"


def _split_credentials(url: str) -> tuple[SplitResult, str | None, str | None]:
    """Split ``scheme://user:password@host:port`` at the *last* ``@``, so a password with an
    unencoded ``#``, ``?``, ``/``, ``@`` or ``:`` is still a password (percent-encoding is decoded),
    and parse the rest as a URL without credentials."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return urlsplit(url), None, None
    userinfo, host_part = rest.rsplit("@", 1)
    user, colon, password = userinfo.partition(":")
    return (urlsplit(f"{scheme}://{host_part}"), unquote(user) if user else None,
            unquote(password) if colon else None)


def _port(name: str, parts: SplitResult, default: int) -> int:
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(name, f"port must be an integer 1-65535 in "
                                f"{_redacted(parts.geturl())!r}") from None
    if port == 0:
        raise ConfigError(name, f"port must be 1-65535 in {_redacted(parts.geturl())!r}")
    return default if port is None else port


def load_ca_cert(env: Env, name: str = "MQTT_TLS_CA_CERT") -> Path:
    """The CA certificate file; it must exist, be readable and hold a PEM certificate."""
    path = Path(_get(env, name) or DEFAULT_CA_CERT)
    if not path.is_file():
        raise ConfigError(name, f"CA certificate file {str(path)!r} does not exist")
    try:
        head = path.read_bytes()[:65536]
    except OSError as exc:
        raise ConfigError(name, f"CA certificate file {str(path)!r} is not readable: {exc}") from None
    if b"-----BEGIN CERTIFICATE-----" not in head:
        raise ConfigError(name, f"{str(path)!r} holds no PEM certificate")
    return path


def load_topic(env: Env) -> str:
    """``MQTT_TOPIC``, the base topic (default ``home/power``)."""
    try:
        return validate_base_topic(_get(env, "MQTT_TOPIC") or DEFAULT_TOPIC)
    except TopicError as exc:
        raise ConfigError("MQTT_TOPIC", str(exc)) from None


def load_receipt_topic(env: Env, base: str) -> str:
    """``MQTT_RECEIPT_TOPIC``, the root of the gateway's receipts (default ``homeiot/receipts``)."""
    try:
        return validate_receipt_root(_get(env, "MQTT_RECEIPT_TOPIC") or DEFAULT_RECEIPT_TOPIC, base)
    except TopicError as exc:
        raise ConfigError("MQTT_RECEIPT_TOPIC", str(exc)) from None


def load_source_default(env: Env) -> str:
    """``SOURCE_DEFAULT``, the source of a meter when none is given (default ``meter1``)."""
    try:
        return validate_source(_get(env, "SOURCE_DEFAULT") or DEFAULT_SOURCE)
    except TopicError as exc:
        raise ConfigError("SOURCE_DEFAULT", str(exc)) from None


def load_mqtt(env: Env | None = None) -> MqttSettings:
    """MQTT settings from ``MQTT_BROKER_URL`` (``mqtts://user:pass@host:8883``, credentials
    percent-encoded), or from ``MQTT_HOST``/``MQTT_PORT``/``MQTT_USER``/``MQTT_PASSWORD`` when the
    URL is not set. Credentials in the URL win over ``MQTT_USER``/``MQTT_PASSWORD``.
    """
    env = os.environ if env is None else env
    url = _get(env, "MQTT_BROKER_URL")
    if url is not None:
        name = "MQTT_BROKER_URL"
        url = url.strip()
        parts, url_user, url_password = _split_credentials(url)
        shown = _redacted(url)
        if parts.scheme != "mqtts":
            raise ConfigError(
                name, f"scheme must be 'mqtts' (TLS is required), got {shown!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(name, f"must be mqtts://user:pass@host:port with no path or query, "
                                    f"got {shown!r}")
        host = parts.hostname
        if not host:
            raise ConfigError(name, f"has no host name: {shown!r}")
        port = _port(name, parts, DEFAULT_MQTT_PORT)
        username = url_user or _get(env, "MQTT_USER")
        password = url_password or _get(env, "MQTT_PASSWORD")
        user_var = name if url_user else "MQTT_USER"
        pass_var = name if url_password else "MQTT_PASSWORD"
    else:
        host = _get(env, "MQTT_HOST")
        if host is None:
            raise ConfigError("MQTT_BROKER_URL", "is not set (nor is MQTT_HOST)")
        host = host.strip()
        # One ':' means "host:port" was given here; IPv6 addresses have several.
        if not host or any(c in host for c in "/@ ") or host.count(":") == 1:
            # Not echoed: someone may have pasted user:password@host here.
            raise ConfigError("MQTT_HOST", "must be a bare host name or IP address (no scheme, "
                                           "port, credentials or spaces)")
        port = _int(env, "MQTT_PORT", DEFAULT_MQTT_PORT, 1, 65535)
        username, password = _get(env, "MQTT_USER"), _get(env, "MQTT_PASSWORD")
        user_var, pass_var = "MQTT_USER", "MQTT_PASSWORD"
    if not username:
        raise ConfigError(user_var, "no MQTT user name given; the broker allows no anonymous clients")
    if not password:
        raise ConfigError(pass_var, "no MQTT password given")
    client_id = _get(env, "MQTT_CLIENT_ID")
    if client_id is not None and (len(client_id.encode()) > 65535 or not client_id.isprintable()):
        raise ConfigError("MQTT_CLIENT_ID", "must be printable and at most 65535 bytes")
    topic = load_topic(env)
    return MqttSettings(
        host=host,
        port=port,
        username=username,
        password=password,
        ca_cert=load_ca_cert(env),
        topic=topic,
        receipt_topic=load_receipt_topic(env, topic),
        client_id=client_id,
        keepalive_s=_int(env, "MQTT_KEEPALIVE_S", 60, 5, 65535),
        session_expiry_s=_int(env, "MQTT_SESSION_EXPIRY_S", DEFAULT_SESSION_EXPIRY_S, 0,
                              2**32 - 1),
    )


def load_influx(env: Env | None = None) -> InfluxSettings:
    """InfluxDB settings from ``INFLUXDB_*`` (see docs/configuration.md)."""
    env = os.environ if env is None else env
    raw_url = (_get(env, "INFLUXDB_URL") or DEFAULT_INFLUX_URL).strip()
    parts, url_user, url_password = _split_credentials(raw_url)
    if url_user is not None or url_password is not None:
        raise ConfigError("INFLUXDB_URL", "must not carry credentials; use INFLUXDB_USER/"
                                          "INFLUXDB_PASSWORD or INFLUXDB_TOKEN")
    if parts.query or parts.fragment:
        # Not echoed: ?u=…&p=… is how InfluxDB 1.x takes credentials.
        raise ConfigError("INFLUXDB_URL", "must have no query or fragment (credentials go in "
                                          "INFLUXDB_USER/INFLUXDB_PASSWORD or INFLUXDB_TOKEN)")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("INFLUXDB_URL",
                          f"must be http(s)://host:port, got {_redacted(raw_url)!r}")
    _port("INFLUXDB_URL", parts, 8086)
    database = _get(env, "INFLUXDB_DB") or DEFAULT_INFLUX_DB
    if not database.isprintable() or '"' in database:
        raise ConfigError("INFLUXDB_DB", f"must be printable without '\"', got {database!r}")
    rp = _get(env, "INFLUXDB_RP")
    if rp is not None and (not rp.isprintable() or '"' in rp):
        raise ConfigError("INFLUXDB_RP", f"must be printable without '\"', got {rp!r}")
    measurement = _get(env, "INFLUXDB_MEASUREMENT") or DEFAULT_MEASUREMENT
    try:
        escape_measurement(measurement)
    except EncodingError as exc:
        raise ConfigError("INFLUXDB_MEASUREMENT", str(exc)) from None
    if '"' in measurement:
        raise ConfigError("INFLUXDB_MEASUREMENT", "must not contain '\"'")
    auth, username, password, token = _influx_auth(env)
    return InfluxSettings(
        url=raw_url.rstrip("/"),
        database=database,
        retention_policy=rp,
        auth=auth,
        username=username,
        password=password,
        token=token,
        measurement=measurement,
        timeout_s=_float(env, "INFLUXDB_TIMEOUT_S", 10.0, 0.1, 600.0),
    )


def _influx_auth(env: Env) -> tuple[InfluxAuth, str | None, str | None, str | None]:
    """The auth mode and the credentials it uses: ``INFLUXDB_AUTH`` or inferred from which
    secrets are set (token first, then user/password, else none)."""
    username, password, token = (
        _get(env, "INFLUXDB_USER"), _get(env, "INFLUXDB_PASSWORD"), _get(env, "INFLUXDB_TOKEN")
    )
    auth_raw = _get(env, "INFLUXDB_AUTH")
    if auth_raw is None:
        auth_raw = "token" if token else "password" if username else "none"
    if auth_raw == "token":
        if not token:
            raise ConfigError("INFLUXDB_TOKEN", "is required when INFLUXDB_AUTH is token")
        return "token", None, None, token
    if auth_raw == "password":
        if not username:
            raise ConfigError("INFLUXDB_USER", "is required when INFLUXDB_AUTH is password")
        if not password:
            raise ConfigError("INFLUXDB_PASSWORD", "is required when INFLUXDB_AUTH is password")
        return "password", username, password, None
    if auth_raw == "none":
        return "none", None, None, None
    raise ConfigError("INFLUXDB_AUTH", f"must be none, password or token, got {auth_raw!r}")


DEFAULT_TIMEZONE = "Asia/Tokyo"
DEFAULT_DEAD_LETTER_DB = "/data/gateway/dead_letters.sqlite"
_MIN_TOKEN_LENGTH = 16


def load_timezone(env: Env, name: str = "HOMEIOT_TIMEZONE") -> ZoneInfo:
    """The time zone that defines a "day" (default Asia/Tokyo)."""
    key = _get(env, name) or DEFAULT_TIMEZONE
    try:
        return ZoneInfo(key)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(name, f"unknown time zone {key!r} (use an IANA name like Asia/Tokyo)"
                          ) from None


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """The gateway: MQTT → InfluxDB with manual acks, dead letters, and the API on :8000."""

    mqtt: MqttSettings
    influx: InfluxSettings
    client_id: str
    share_group: str | None = None
    batch_size: int = 5000
    batch_age_s: float = 0.5
    max_future_s: float = 600.0
    dead_letter_db: Path = Path(DEFAULT_DEAD_LETTER_DB)
    api_tokens: tuple[str, ...] = field(default=(), repr=False)
    api_host: str = "0.0.0.0"  # noqa: S104 - inside the compose network; never published
    api_port: int = 8000
    timezone: ZoneInfo = field(default_factory=lambda: ZoneInfo(DEFAULT_TIMEZONE))
    source_default: str = DEFAULT_SOURCE


def load_api_tokens(env: Env) -> tuple[str, ...]:
    """``API_TOKENS``: comma-separated bearer tokens, each at least 16 characters."""
    raw = _get(env, "API_TOKENS")
    if raw is None:
        raise ConfigError("API_TOKENS", "is not set; the API is on the internet and needs at least "
                                        "one bearer token")
    tokens = tuple(t.strip() for t in raw.split(",") if t.strip())
    if not tokens:
        raise ConfigError("API_TOKENS", "holds no token")
    for index, token in enumerate(tokens, 1):
        if len(token) < _MIN_TOKEN_LENGTH or not token.isprintable() or " " in token:
            raise ConfigError("API_TOKENS", f"token #{index} must be at least {_MIN_TOKEN_LENGTH} "
                                            "printable characters without spaces")
    return tokens


def load_gateway(env: Env | None = None) -> GatewaySettings:
    """Gateway settings: the MQTT and InfluxDB ones plus ``GATEWAY_*`` and ``API_*``."""
    env = os.environ if env is None else env
    mqtt = load_mqtt(env)
    share_group = _get(env, "GATEWAY_SHARE_GROUP")
    if share_group is not None:
        try:
            subscription_filter(mqtt.topic, share_group)
        except TopicError as exc:
            raise ConfigError("GATEWAY_SHARE_GROUP", str(exc)) from None
    client_id = _get(env, "GATEWAY_CLIENT_ID") or mqtt.client_id or "homeiot-gateway"
    return GatewaySettings(
        mqtt=mqtt,
        influx=load_influx(env),
        client_id=client_id,
        share_group=share_group,
        batch_size=_int(env, "GATEWAY_BATCH_SIZE", 5000, 1, 50_000),
        batch_age_s=_float(env, "GATEWAY_BATCH_AGE_S", 0.5, 0.01, 60.0),
        max_future_s=_float(env, "GATEWAY_MAX_FUTURE_S", 600.0, 0.0, 366 * 86400.0),
        dead_letter_db=Path(_get(env, "GATEWAY_DEAD_LETTER_DB") or DEFAULT_DEAD_LETTER_DB),
        api_tokens=load_api_tokens(env),
        api_host=_get(env, "API_HOST") or "0.0.0.0",  # noqa: S104 - see GatewaySettings
        api_port=_int(env, "API_PORT", 8000, 1, 65535),
        timezone=load_timezone(env),
        source_default=load_source_default(env),
    )


DEFAULT_PARQUET_ROOT = "/data/parquet"
DEFAULT_DUCKDB_PATH = "/data/duckdb/home_energy.duckdb"


@dataclass(frozen=True, slots=True)
class ArchiveSettings:
    """The archiver: InfluxDB → Parquet → DuckDB, one local day at a time."""

    influx: InfluxSettings
    parquet_root: Path = Path(DEFAULT_PARQUET_ROOT)
    duckdb_path: Path = Path(DEFAULT_DUCKDB_PATH)
    timezone: ZoneInfo = field(default_factory=lambda: ZoneInfo(DEFAULT_TIMEZONE))
    chunk_size: int = 10_000
    max_days: int = 31
    source_default: str = DEFAULT_SOURCE
    duckdb_memory_limit: str = "128MB"
    #: Trailing archived days each run compares with InfluxDB (0: none).
    reconcile_days: int = 7
    #: Seconds the fresh-process verification of the built database may take.
    verify_timeout_s: int = 3600


_MEMORY_LIMIT = re.compile(r"[1-9][0-9]{0,5}(\.[0-9]+)?\s*(KB|MB|GB|KiB|MiB|GiB)")


def load_archive(env: Env | None = None) -> ArchiveSettings:
    """Archive settings: ``INFLUXDB_*``, ``ARCHIVE_*`` and ``HOMEIOT_TIMEZONE``."""
    env = os.environ if env is None else env
    duckdb_path = Path(_get(env, "ARCHIVE_DUCKDB_PATH") or DEFAULT_DUCKDB_PATH)
    if duckdb_path.suffix != ".duckdb":
        raise ConfigError("ARCHIVE_DUCKDB_PATH", f"must end in .duckdb, got {str(duckdb_path)!r}")
    return ArchiveSettings(
        influx=load_influx(env),
        parquet_root=Path(_get(env, "ARCHIVE_PARQUET_ROOT") or DEFAULT_PARQUET_ROOT),
        duckdb_path=duckdb_path,
        timezone=load_timezone(env),
        chunk_size=_int(env, "ARCHIVE_CHUNK_SIZE", 10_000, 100, 1_000_000),
        max_days=_int(env, "ARCHIVE_MAX_DAYS", 31, 1, 3660),
        source_default=load_source_default(env),
        duckdb_memory_limit=_memory_limit(env),
        reconcile_days=_int(env, "ARCHIVE_RECONCILE_DAYS", 7, 0, 366),
        verify_timeout_s=_int(env, "ARCHIVE_VERIFY_TIMEOUT_S", 3600, 1, 86_400),
    )


def _memory_limit(env: Env) -> str:
    value = (_get(env, "ARCHIVE_DUCKDB_MEMORY_LIMIT") or "128MB").strip()
    if _MEMORY_LIMIT.fullmatch(value) is None:
        raise ConfigError("ARCHIVE_DUCKDB_MEMORY_LIMIT", f"must be a size like 128MB or 1GB, got "
                                                         f"{value!r}")
    return value


DEFAULT_OUTBOX = "/var/lib/homeiot/outbox.sqlite"


@dataclass(frozen=True, slots=True)
class PublisherSettings:
    """The Raspberry Pi publisher: meter → outbox → MQTT."""

    mqtt: MqttSettings
    source: str
    client_id: str
    meter: Literal["simulated", "broute"] = "simulated"
    interval_s: float = 10.0
    outbox: Path = Path(DEFAULT_OUTBOX)
    outbox_max_rows: int = 2_000_000
    outbox_max_age_days: float = 30.0
    backlog_rate: float = 100.0
    window: int = 100
    receipt_timeout_s: float = 30.0
    unreceipted_max: int = 10_000
    seed: int = 1
    timezone: ZoneInfo = field(default_factory=lambda: ZoneInfo(DEFAULT_TIMEZONE))
    broute_id: str = field(default="", repr=False)
    broute_password: str = field(default="", repr=False)
    broute_device: str = "/dev/ttyUSB0"
    broute_timing: LinkTiming = field(default_factory=LinkTiming)
    broute_policy: LinkPolicy = field(default_factory=LinkPolicy)
    broute_history_days: int = 2


def _broute_link(env: Env) -> tuple[LinkTiming, LinkPolicy]:
    """``BROUTE_*`` bounds and the recovery ladder's patience (docs/configuration.md)."""
    timing = LinkTiming(
        request_timeout_s=_float(env, "BROUTE_REQUEST_TIMEOUT_S", 15.0, 0.1, 600.0),
        answer_timeout_s=_float(env, "BROUTE_ANSWER_TIMEOUT_S", 8.0, 0.1, 120.0),
        request_retries=_int(env, "BROUTE_REQUEST_RETRIES", 2, 1, 10),
        scan_timeout_s=_float(env, "BROUTE_SCAN_TIMEOUT_S", 120.0, 0.1, 1800.0),
        join_timeout_s=_float(env, "BROUTE_JOIN_TIMEOUT_S", 60.0, 0.1, 600.0),
    )
    backoff_min = _float(env, "BROUTE_BACKOFF_MIN_S", 10.0, 0.0, 3600.0)
    policy = LinkPolicy(
        max_misses=_int(env, "BROUTE_MAX_MISSES", 2, 1, 100),
        dead_after_s=_float(env, "BROUTE_DEAD_AFTER_S", 90.0, 1.0, 86400.0),
        rejoin_attempts=_int(env, "BROUTE_REJOIN_ATTEMPTS", 1, 0, 100),
        reset_attempts=_int(env, "BROUTE_RESET_ATTEMPTS", 3, 1, 100),
        backoff_min_s=backoff_min,
        backoff_max_s=_float(env, "BROUTE_BACKOFF_MAX_S", max(300.0, backoff_min), backoff_min,
                             86400.0),
    )
    return timing, policy


def _broute_credentials(env: Env) -> tuple[str, str]:
    rbid, password = _get(env, "BROUTE_ID"), _get(env, "BROUTE_PASSWORD")
    if rbid is None or len(rbid) != 32 or not rbid.isalnum():
        raise ConfigError("BROUTE_ID", "must be the 32-character B-route ID from the power company")
    if password is None or len(password) != 12 or not password.isalnum():
        raise ConfigError("BROUTE_PASSWORD", "must be the 12-character B-route password")
    return rbid, password


def load_publisher(env: Env | None = None) -> PublisherSettings:
    """Publisher settings: the MQTT ones plus ``PUBLISHER_*`` (docs/configuration.md)."""
    env = os.environ if env is None else env
    mqtt = load_mqtt(env)
    source = load_source_default(env)
    meter = _get(env, "PUBLISHER_METER") or "broute"
    rbid = password = ""
    timing, policy = LinkTiming(), LinkPolicy()
    if meter == "broute":
        rbid, password = _broute_credentials(env)
        timing, policy = _broute_link(env)
    elif meter != "simulated":
        raise ConfigError("PUBLISHER_METER", f"must be broute or simulated, got {meter!r}")
    history_days = _int(env, "BROUTE_HISTORY_DAYS", 2, 0, 99)
    max_age_days = _float(env, "PUBLISHER_OUTBOX_MAX_AGE_DAYS", 30.0, 1.0, 3650.0)
    if history_days >= max_age_days:  # the outbox would drop the slots read back at once
        raise ConfigError("BROUTE_HISTORY_DAYS", f"must be less than PUBLISHER_OUTBOX_MAX_AGE_DAYS "
                                                 f"({max_age_days:g}), got {history_days}")
    return PublisherSettings(
        mqtt=mqtt,
        source=source,
        client_id=mqtt.client_id or f"homeiot-publisher-{source}",
        meter="broute" if meter == "broute" else "simulated",
        broute_id=rbid,
        broute_password=password,
        broute_device=_get(env, "BROUTE_DEVICE") or "/dev/ttyUSB0",
        broute_timing=timing,
        broute_policy=policy,
        broute_history_days=history_days,
        interval_s=_float(env, "PUBLISHER_INTERVAL_S", 10.0, 0.01, 3600.0),
        outbox=Path(_get(env, "PUBLISHER_OUTBOX") or DEFAULT_OUTBOX),
        outbox_max_rows=_int(env, "PUBLISHER_OUTBOX_MAX_ROWS", 2_000_000, 1000, 100_000_000),
        outbox_max_age_days=max_age_days,
        backlog_rate=_float(env, "PUBLISHER_BACKLOG_RATE", 100.0, 1.0, 100_000.0),
        window=_int(env, "PUBLISHER_WINDOW", 100, 1, 10_000),
        receipt_timeout_s=_float(env, "PUBLISHER_RECEIPT_TIMEOUT_S", 30.0, 0.1, 3600.0),
        unreceipted_max=_int(env, "PUBLISHER_UNRECEIPTED_MAX", 10_000, 1, 1_000_000),
        seed=_int(env, "SIMULATED_SEED", 1, 0, 2**31),
        timezone=load_timezone(env),
    )


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of an env file (as systemd's EnvironmentFile reads them): blank lines and
    ``#`` comments skipped, one pair of surrounding quotes removed."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("--env-file", f"cannot read {str(path)!r}: {exc}") from None
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ConfigError("--env-file", f"{path}:{number} is not KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values
