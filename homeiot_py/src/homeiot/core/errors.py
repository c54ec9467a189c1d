"""The error hierarchy.

Every error the package raises on purpose derives from :class:`HomeIotError`. The subclasses say
what the caller should do about it, not where it happened:

* :class:`ConfigError` — fix the configuration; retrying cannot help. Processes exit non-zero.
* :class:`InvalidDataError` — this piece of data is bad; set it aside (dead letters) and go on.
* :class:`TransientError` — a peer is unavailable right now; retry later with backoff.
* :class:`RejectedError` — a peer refused the request for good (auth, bad request); do not retry
  the same request.
"""

from __future__ import annotations

from collections.abc import Sequence


class HomeIotError(Exception):
    """Root of every error raised on purpose by ``homeiot``."""


class ConfigError(HomeIotError):
    """A configuration value is missing or wrong; ``variable`` names it."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


class InvalidDataError(HomeIotError, ValueError):
    """Data that can never be processed as it is (a bad payload, an impossible value)."""


class InvalidReadingError(InvalidDataError):
    """A reading's values are impossible or out of range; ``field`` names the culprit."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class PayloadError(InvalidDataError):
    """An MQTT payload is not a valid schema-v1 reading (bad JSON, schema violation)."""


class TopicError(InvalidDataError):
    """A topic or source name does not fit the topic contract ``{MQTT_TOPIC}/{source}``."""


class EncodingError(InvalidDataError):
    """A value cannot be expressed in InfluxDB line protocol (NaN, a newline, an empty key …)."""


class TransientError(HomeIotError):
    """A peer is unavailable right now (down, unreachable, overloaded); retry with backoff."""


class RejectedError(HomeIotError):
    """A peer refused the request for good; sending it again unchanged cannot succeed."""


class MqttConnectionError(TransientError):
    """The MQTT broker could not be reached or the connection was lost."""


class MqttTlsError(RejectedError):
    """The broker's certificate was not accepted (wrong CA, host name not in the SAN)."""


class MqttAuthError(RejectedError):
    """The broker refused our credentials or our right to connect."""


class InfluxUnavailableError(TransientError):
    """InfluxDB did not answer, timed out, or answered 5xx."""


class InfluxAuthError(RejectedError):
    """InfluxDB refused our credentials (401/403)."""


class InfluxRejectedError(RejectedError):
    """InfluxDB refused the request (4xx): a bad query, a missing database, a bad line."""


class InfluxPartialWriteError(InfluxRejectedError):
    """InfluxDB stored some lines of a write and dropped others.

    ``lines`` holds the offending lines InfluxDB quoted back (possibly empty when the error does
    not quote them, e.g. a field type conflict); ``dropped`` the count InfluxDB reported, if any.
    """

    def __init__(self, message: str, lines: Sequence[str], dropped: int | None) -> None:
        super().__init__(message)
        self.lines = tuple(lines)
        self.dropped = dropped


class InfluxQueryError(InfluxRejectedError):
    """An InfluxQL statement failed (syntax, unknown database …)."""


class StorageError(HomeIotError):
    """A local store (SQLite: the dead letters, the outbox) cannot be written — a full or
    read-only disk, a lock held too long. Nothing that depends on it may be acknowledged; the
    process stops loudly rather than going on without it."""


class MeterUnavailableError(TransientError):
    """The meter or the Wi-SUN dongle did not answer; the backend reconnects with backoff."""


class MeterAuthError(RejectedError):
    """The B-route ID or password was refused. Retrying could lock the household's B-route
    account, so the publisher stops; fix BROUTE_ID/BROUTE_PASSWORD and start it again."""


class MeterLinkDeadError(HomeIotError):
    """The B-route link did not come back after every recovery step (re-request, rejoin, dongle
    reset). The publisher exits non-zero (status 4) so that systemd starts a fresh process."""
