"""The gateway: MQTT → InfluxDB with at-least-once delivery.

Messages arrive on paho's network thread, are decoded at once (``core``) and collected into a
batch. A writer thread writes each batch to InfluxDB and only then acknowledges its messages, in
arrival order (MQTT v5, ``manual_ack``). The session is persistent (fixed client id,
``clean_start=False``, a session expiry), so what is published while the gateway is down waits in
the broker. ``Receive Maximum`` caps the unacknowledged messages the broker sends us, which bounds
memory while InfluxDB is down: the backlog stays in the broker.

Invalid payloads become dead letters (stored before they are acknowledged); a batch that InfluxDB
refuses in part has its refused lines set aside the same way. Nothing is acknowledged that is not
stored somewhere durable.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from homeiot.adapters import mqtt as mqtt_adapter
from homeiot.adapters.deadletters import DeadLetter, DeadLetterStore
from homeiot.adapters.influx import InfluxClient
from homeiot.config import GatewaySettings
from homeiot.core import codec
from homeiot.core.errors import HomeIotError, InfluxPartialWriteError, InvalidDataError
from homeiot.core.lineprotocol import encode_reading
from homeiot.core.reading import check_not_future
from homeiot.core.topics import source_from_topic, subscription_filter

logger = logging.getLogger(__name__)

#: How long a clean shutdown may spend flushing before it gives up (the rest is redelivered).
SHUTDOWN_FLUSH_S = 8.0
_BACKOFF_MIN_S = 0.5
_BACKOFF_MAX_S = 10.0


@dataclass(slots=True)
class _Item:
    """One received message on its way to InfluxDB (or to the dead letters)."""

    mid: int
    qos: int
    generation: int
    topic: str
    payload: bytes
    received_at: datetime
    line: str | None = None
    error: str | None = None
    source: str | None = None
    ts: datetime | None = None


class _LastReadingAge(Collector):
    """``homeiot_last_reading_age_seconds{source}``, computed when scraped."""

    def __init__(self, last: dict[str, datetime], clock: Callable[[], datetime]) -> None:
        self._last = last
        self._clock = clock

    def collect(self) -> Any:
        family = GaugeMetricFamily("homeiot_last_reading_age_seconds",
                                   "Age of the newest stored reading, per source", labels=["source"])
        now = self._clock()
        for source, ts in sorted(dict(self._last).items()):  # a copy: the writer adds sources
            family.add_metric([source], (now - ts).total_seconds())
        yield family


class GatewayMetrics:
    """The gateway's Prometheus metrics, in a registry of its own."""

    def __init__(self, last_reading: dict[str, datetime], clock: Callable[[], datetime]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("homeiot_messages_received", "MQTT messages received", registry=r)
        self.written = Counter("homeiot_points_written", "Points accepted by InfluxDB", registry=r)
        self.dead = Counter("homeiot_dead_letters", "Messages set aside as dead letters",
                            registry=r)
        self.write_errors = Counter("homeiot_influx_write_errors",
                                    "Failed InfluxDB write attempts (retried)", registry=r)
        self.batch_latency = Histogram(
            "homeiot_batch_latency_seconds", "Time to store and acknowledge one batch",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.backlog = Gauge("homeiot_backlog_messages",
                             "Messages received but not yet acknowledged", registry=r)
        r.register(_LastReadingAge(last_reading, clock))


class Gateway:
    """Consume readings from MQTT and store them in InfluxDB; see the module docstring."""

    def __init__(self, settings: GatewaySettings, influx: InfluxClient,
                 dead_letters: DeadLetterStore, *,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 on_fatal: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.influx = influx
        self.dead_letters = dead_letters
        self._clock = clock
        self._on_fatal = on_fatal
        self._max_ahead = timedelta(seconds=settings.max_future_s)
        self._measurement = settings.influx.measurement
        self._topic_filter = subscription_filter(settings.mqtt.topic, settings.share_group)
        self.last_reading: dict[str, datetime] = {}
        self.metrics = GatewayMetrics(self.last_reading, clock)
        self.fatal_error: str | None = None
        self.mqtt_connected = False
        self.influx_ok = True
        # The broker sends at most this many unacknowledged messages: two batches, so one fills
        # while the other is written.
        self.receive_maximum = min(65535, 2 * settings.batch_size)

        self._lock = threading.Lock()
        self._batch: list[_Item] = []
        self._batch_started = 0.0
        self._ready: queue.Queue[list[_Item]] = queue.Queue()
        self._pending = 0
        self._generation = 0
        self._stopping = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name="gateway-writer", daemon=True)
        self._client = mqtt_adapter.create_client(settings.mqtt, client_id=settings.client_id,
                                                  manual_ack=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_connect_fail = self._on_connect_fail

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect (in the background, retrying by itself) and start consuming."""
        s = self.settings.mqtt
        logger.info("gateway starting: broker=%s:%s client_id=%s subscription=%s batch=%d/%.2fs",
                    s.host, s.port, self.settings.client_id, self._topic_filter,
                    self.settings.batch_size, self.settings.batch_age_s)
        self._writer.start()
        self._client.connect_async(
            s.host, s.port, keepalive=s.keepalive_s, clean_start=False,
            properties=mqtt_adapter.connect_properties(s.session_expiry_s, self.receive_maximum))
        self._client.loop_start()

    def stop(self, timeout_s: float = SHUTDOWN_FLUSH_S) -> None:
        """Flush what was received, acknowledge what was written, disconnect. Never unsubscribes:
        the persistent session keeps collecting while we are away."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._writer.join(timeout_s)
        if self._writer.is_alive():
            logger.warning("gateway stop: flush unfinished after %.1f s; the broker redelivers "
                           "the rest", timeout_s)
        mqtt_adapter.close(self._client)
        logger.info("gateway stopped: pending=%d", self._pending)

    # --- paho callbacks (network thread) --------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Any) -> None:
        if reason.is_failure:
            logger.error("broker refused the connection: %s", reason)
            if reason.value in mqtt_adapter.AUTH_REASONS:
                self._fatal(f"the broker refused our credentials ({reason}); check MQTT_USER/"
                            "MQTT_PASSWORD or MQTT_BROKER_URL")
            return
        with self._lock:
            self._generation += 1  # acks for messages of earlier connections are void now
        self.mqtt_connected = True
        if not flags.session_present:
            logger.warning("broker had no session for %s: messages published while we were away "
                           "(if any) were not kept", self.settings.client_id)
        client.subscribe(self._topic_filter, qos=1)
        logger.info("connected: session_present=%s", flags.session_present)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        logger.warning("cannot connect to the broker at %s:%s; retrying",
                       self.settings.mqtt.host, self.settings.mqtt.port)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Any) -> None:
        self.mqtt_connected = False
        if not self._stopping.is_set():
            logger.warning("disconnected from the broker: %s; reconnecting", reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # paho issue #472: callbacks registered per "$share/..." filter never fire, so every
        # message comes through this one on_message.
        payload = msg.payload if isinstance(msg.payload, bytes) else bytes(msg.payload)
        item = _Item(msg.mid, msg.qos, self._generation, msg.topic, payload, self._clock())
        try:
            source = source_from_topic(self.settings.mqtt.topic, msg.topic)
            reading = check_not_future(codec.decode(payload, source), item.received_at,
                                       self._max_ahead)
            item.line = encode_reading(reading, self._measurement)
            item.source, item.ts = source, reading.ts
        except InvalidDataError as exc:
            item.error = str(exc)
        self.metrics.received.inc()
        with self._lock:
            if not self._batch:
                self._batch_started = time.monotonic()
            self._batch.append(item)
            self._pending += 1
            if len(self._batch) >= self.settings.batch_size:
                self._ready.put(self._batch)
                self._batch = []

    # --- writer thread --------------------------------------------------------------------------

    def _take_aged_batch(self, force: bool) -> list[_Item] | None:
        with self._lock:
            if self._batch and (force or time.monotonic() - self._batch_started
                                >= self.settings.batch_age_s):
                batch, self._batch = self._batch, []
                return batch
        return None

    def _write_loop(self) -> None:
        age = self.settings.batch_age_s
        deadline: float | None = None
        while True:
            stopping = self._stopping.is_set()
            if stopping and deadline is None:
                deadline = time.monotonic() + SHUTDOWN_FLUSH_S
            try:
                batch: list[_Item] | None = self._ready.get(timeout=min(age / 4, 0.05)
                                                            if not stopping else 0)
            except queue.Empty:
                batch = self._take_aged_batch(force=stopping)
            if batch:
                if not self._flush(batch, deadline):
                    return
            elif stopping:
                return
            self.metrics.backlog.set(self._pending)

    def _flush(self, batch: list[_Item], deadline: float | None) -> bool:
        """Store a batch and acknowledge it; False when shutdown came first (nothing acked)."""
        started = time.monotonic()
        lines = [item.line for item in batch if item.line is not None]
        if lines and not self._write(lines, batch, deadline):
            return False
        letters = [DeadLetter(i.topic, i.payload, i.error, i.received_at)
                   for i in batch if i.error is not None]
        if letters:
            self.dead_letters.add(letters)
            self.metrics.dead.inc(len(letters))
            logger.warning("dead letters: %d (first: topic=%s error=%s)", len(letters),
                           letters[0].topic, letters[0].error)
        with self._lock:
            generation = self._generation
        for item in batch:  # arrival order
            if item.generation == generation:
                self._client.ack(item.mid, item.qos)
            if item.ts is not None and item.error is None:
                newest = self.last_reading.get(item.source or "")
                if newest is None or item.ts > newest:
                    self.last_reading[item.source or ""] = item.ts
        with self._lock:
            self._pending -= len(batch)
        self.metrics.written.inc(sum(1 for i in batch if i.line is not None and i.error is None))
        self.metrics.batch_latency.observe(time.monotonic() - started)
        return True

    def _write(self, lines: list[str], batch: list[_Item], deadline: float | None) -> bool:
        """Write until InfluxDB accepts (retrying with capped, jittered backoff); lines it refuses
        for good become dead letters. False when shutdown's deadline passed first."""
        delay = _BACKOFF_MIN_S
        while True:
            try:
                self.influx.write(lines, batch_size=len(lines))
            except InfluxPartialWriteError as exc:
                self._set_aside(batch, exc)
                self.influx_ok = True
                return True
            except HomeIotError as exc:
                self.influx_ok = False
                self.metrics.write_errors.inc()
                logger.warning("InfluxDB write failed, %d points held (not acknowledged), retry in "
                               "%.1f s: %s", len(lines), delay, exc)
            else:
                self.influx_ok = True
                return True
            if deadline is not None and time.monotonic() + delay > deadline:
                return False
            if self._stopping.wait(delay) and deadline is None:
                deadline = time.monotonic() + SHUTDOWN_FLUSH_S
            delay = min(_BACKOFF_MAX_S, delay * 2) * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not secrecy

    @staticmethod
    def _set_aside(batch: list[_Item], exc: InfluxPartialWriteError) -> None:
        refused = set(exc.lines)
        for item in batch:
            # Without quoted lines (e.g. a field type conflict) we cannot tell which points were
            # dropped: keep every message of the batch; replaying them later is harmless.
            if item.line is not None and (not refused or item.line in refused):
                item.error = f"InfluxDB refused the point: {exc}"

    def _fatal(self, message: str) -> None:
        self.fatal_error = message
        if self._on_fatal is not None:
            self._on_fatal(message)
