"""The publisher: meter → outbox (SQLite) → MQTT QoS 1; a reading leaves the outbox only when
the gateway's receipt says InfluxDB stored it.

Two threads. The meter thread reads the meter every ``interval_s`` and hands readings over. The
pump thread owns the outbox: it commits what the meter handed over (one transaction for whatever
is waiting), publishes new readings at once, drains the backlog (what was in the outbox when the
connection came up) oldest first at ``backlog_rate``, and feeds the delivery state machine
(:mod:`homeiot.core.publishing`) with PUBACKs and receipts, carrying out what it decides.

A PUBACK only means "in flight": a good one makes the row wait for its receipt (on
``{MQTT_RECEIPT_TOPIC}/{source}``), a refusal (0x87 "not authorized" when the ACL does not let us
write the topic, 0x10 "no matching subscribers" when the gateway's session is gone) keeps the row,
is logged at ERROR once per change of reason, and the row is resent with backoff. A row whose
receipt does not come in ``receipt_timeout_s`` is resent, with a doubling timeout. At most
``window`` messages await their PUBACK and ``unreceipted_max`` their receipt.

paho resends its own in-flight messages after a reconnect; rows it holds are skipped when the
backlog is drained. After a restart everything in the outbox is sent again — a reading stored
twice overwrites itself in InfluxDB, so duplicates are harmless and nothing is lost.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from homeiot.adapters import mqtt as mqtt_adapter
from homeiot.adapters.meters import Meter
from homeiot.adapters.outbox import Outbox
from homeiot.config import PublisherSettings
from homeiot.core import publishing, receipts
from homeiot.core.errors import HomeIotError, InvalidDataError, MeterLinkDeadError, RejectedError
from homeiot.core.publishing import PublisherFlow
from homeiot.core.reading import Reading, epoch_ms
from homeiot.core.receipts import receipt_topic
from homeiot.core.topics import topic_for

logger = logging.getLogger(__name__)

_PRUNE_EVERY_S = 600.0
_STATS_EVERY_S = 60.0


def sd_notify(message: str) -> None:
    """Tell systemd about our state (``READY=1``, ``WATCHDOG=1``, …) when run as a notify unit."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.send(message.encode(), socket.MSG_DONTWAIT)  # never block the pump on systemd
        except OSError as exc:
            logger.debug("sd_notify failed: %s", exc)


class Publisher:
    """See the module docstring."""

    def __init__(self, settings: PublisherSettings, meter: Meter, outbox: Outbox) -> None:
        self.settings = settings
        self.meter = meter
        self.outbox = outbox
        self.topic = topic_for(settings.mqtt.topic, settings.source)
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._readings: queue.Queue[Reading] = queue.Queue()
        self._acked: queue.Queue[tuple[int, ReasonCode]] = queue.Queue()
        self._connects = 0
        self._last_ts: dict[tuple[str, bool], datetime] = {}  # (source, slot?) -> newest ts
        self.receipts_topic = receipt_topic(settings.mqtt.receipt_topic, settings.source)
        self._receipts: queue.Queue[bytes] = queue.Queue()
        self.flow = PublisherFlow(self.topic, settings.window,  # pump thread only
                                  unreceipted_max=settings.unreceipted_max,
                                  receipt_timeout_s=settings.receipt_timeout_s)
        self._backlog_cursor = 0
        self._backlog_end = 0
        self._live_after = 0
        self._seen_connects = 0
        self._tokens = 0.0
        self._client = mqtt_adapter.create_client(settings.mqtt, client_id=settings.client_id)
        self._client.max_inflight_messages_set(settings.window)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self._client.on_message = self._on_message
        self._client.on_connect_fail = self._on_connect_fail
        self._report = mqtt_adapter.ConnectionReport(logger, "publisher")
        self._meter_thread = threading.Thread(target=self._meter_loop, name="meter", daemon=True)
        self._watchdog_s = int(os.environ.get("WATCHDOG_USEC", "0")) / 2e6
        self.published = 0
        self.delivered = 0
        self.fatal_error: str | None = None
        self.exit_code = 0  # 3: the meter refused our credentials; 4: the meter link is dead

    # --- paho callbacks (network thread): hand over, never touch the outbox -------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Any) -> None:
        if reason.is_failure:
            # Readings stay in the outbox; paho retries with capped backoff (1 s to 10 s), so a
            # password rotated on the server is picked up within seconds.
            self._report.failed(mqtt_adapter.refusal(reason))
            return
        self._report.connected()
        self._connects += 1
        # Receipts sent while we were away are lost with the clean session: what they named is
        # resent after the receipt timeout, and InfluxDB overwrites it in place.
        client.subscribe(self.receipts_topic, qos=1)
        self.connected.set()
        self._wake.set()
        logger.info("connected to %s:%s", self.settings.mqtt.host, self.settings.mqtt.port)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Any) -> None:
        self.connected.clear()
        if not self._stop.is_set():
            logger.warning("disconnected: %s; readings stay in the outbox (%d)", reason,
                           len(self.outbox))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Any) -> None:
        self._acked.put((mid, reason))
        self._wake.set()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._report.failed(mqtt_adapter.diagnose(self.settings.mqtt))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._receipts.put(bytes(msg.payload))
        self._wake.set()

    # --- lifecycle ------------------------------------------------------------------------------

    def run(self) -> None:
        """Run until :meth:`stop`; commits and publishes on this thread."""
        s = self.settings.mqtt
        try:
            self.meter.open()
        except RejectedError as exc:
            self._fatal(exc)
            return
        self._client.connect_async(s.host, s.port, keepalive=s.keepalive_s, clean_start=True,
                                   properties=mqtt_adapter.connect_properties(0))
        self._client.loop_start()
        self._meter_thread.start()
        sd_notify("READY=1")
        logger.info("publisher running: source=%s topic=%s meter=%s interval=%.2fs outbox=%s "
                    "(%d waiting)", self.settings.source, self.topic, self.settings.meter,
                    self.settings.interval_s, self.settings.outbox, len(self.outbox))
        try:
            self._pump()
        finally:
            self._meter_thread.join(5)
            self._commit()  # what the meter read before the stop is kept for the next start
            self._settle(2.0)
            mqtt_adapter.close(self._client)
            self.meter.close()
            logger.info("publisher stopped: published=%d stored=%d waiting=%d",
                        self.published, self.delivered, len(self.outbox))

    def _fatal(self, exc: RejectedError | MeterLinkDeadError) -> None:
        logger.error("meter: %s; stopping", exc)
        self.fatal_error = str(exc)
        self.exit_code = 3 if isinstance(exc, RejectedError) else 4
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    # --- meter thread ---------------------------------------------------------------------------

    def _meter_loop(self) -> None:
        interval = self.settings.interval_s
        next_at = time.monotonic()
        last_error = ""
        while not self._stop.is_set():
            try:
                self._readings.put(self.meter.read())
                self._wake.set()
                last_error = ""
            except (RejectedError, MeterLinkDeadError) as exc:
                self._fatal(exc)
                return
            except HomeIotError as exc:
                if str(exc) != last_error:  # once per change, not every interval
                    logger.warning("meter read failed: %s", exc)
                    last_error = str(exc)
            except Exception:  # a bug or a driver surprise must not end the readings silently
                logger.exception("meter read failed unexpectedly; trying again next interval")
            try:  # half-hour slots (a live one, or read back after a gap): committed like readings
                for slot in self.meter.pending():
                    self._readings.put(slot)
                    self._wake.set()
            except Exception:  # never lose the pump to the meter
                logger.exception("meter: taking its half-hour slots failed")
            next_at += interval
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind (a slow meter): do not burst to catch up
                next_at = time.monotonic()
                delay = 0
            self._stop.wait(delay)

    # --- pump thread ----------------------------------------------------------------------------

    def _pump(self) -> None:
        last_tick = time.monotonic()
        last_prune = last_stats = last_watchdog = 0.0
        while not self._stop.is_set():
            self._wake.wait(0.05)
            self._wake.clear()
            now = time.monotonic()
            self._tokens = min(self.settings.backlog_rate,
                               self._tokens + (now - last_tick) * self.settings.backlog_rate)
            last_tick = now
            self._commit()
            self._settle_acks()
            if self.connected.is_set():
                self._publish()
            if now - last_prune > _PRUNE_EVERY_S:
                self.outbox.prune_older_than(epoch_ms(datetime.now(UTC)))
                last_prune = now
            if now - last_stats > _STATS_EVERY_S:
                logger.info("publisher: published=%d stored=%d in_flight=%d unreceipted=%d "
                            "waiting=%d", self.published, self.delivered, self.flow.in_flight,
                            self.flow.unreceipted, len(self.outbox))
                last_stats = now
            if self._watchdog_s and now - last_watchdog >= self._watchdog_s:
                sd_notify("WATCHDOG=1")  # from the pump: a stuck pump lets systemd restart us
                last_watchdog = now

    def _commit(self) -> None:
        batch: list[Reading] = []
        while True:
            try:
                reading = self._readings.get_nowait()
            except queue.Empty:
                break
            # InfluxDB keeps one point per source and millisecond: a second live sample in the
            # same millisecond (a meter loop catching up) would overwrite the first and show up
            # as a lost seq. It is the same instant, not a new reading. A half-hour slot reading
            # is never dropped this way: it carries other fields (the half hour's energy), which
            # InfluxDB merges into a live point at the same instant instead of losing them.
            slot = reading.fixed_ts is not None and reading.fixed_ts == reading.ts
            if self._last_ts.get((reading.source, slot)) == reading.ts:
                logger.debug("dropped a second %s sample at %s", "slot" if slot else "live",
                             reading.ts)
                continue
            self._last_ts[(reading.source, slot)] = reading.ts
            batch.append(reading)
        if batch:
            self.outbox.add(batch)

    def _settle_acks(self) -> None:
        actions: list[publishing.Action] = []
        while True:
            try:
                mid, reason = self._acked.get_nowait()
            except queue.Empty:
                break
            actions += self.flow.handle(publishing.PubAck(mid, reason.value, str(reason),
                                                          time.monotonic()))
        while True:
            try:
                payload = self._receipts.get_nowait()
            except queue.Empty:
                break
            try:
                actions += self.flow.handle(publishing.Stored(receipts.decode(payload)))
            except InvalidDataError as exc:
                logger.warning("ignoring a bad receipt on %s: %s", self.receipts_topic, exc)
        self._execute(actions)

    def _execute(self, actions: list[publishing.Action]) -> None:
        deleted: list[int] = []
        for action in actions:
            match action:
                case publishing.Delete(row_ids):
                    deleted += row_ids
                case publishing.Resend(row_ids):
                    for row_id in row_ids:
                        row = self.outbox.get(row_id)
                        if row is None:
                            self.flow.handle(publishing.Gone(row_id))
                        elif self.connected.is_set():
                            self._send(row.id, row.seq, row.payload)
                case publishing.Alarm(message):
                    logger.error("%s (%d waiting)", message, len(self.outbox))
                case publishing.Recovered(message):
                    logger.info("%s (%d waiting)", message, len(self.outbox))
        if deleted:
            self.delivered += self.outbox.delete(deleted)

    def _settle(self, timeout_s: float) -> None:
        """On the way out: wait briefly for PUBACKs of what is in flight (the rest is resent)."""
        deadline = time.monotonic() + timeout_s
        while self.flow.in_flight and self.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
            self._settle_acks()

    def _publish(self) -> None:
        if self._connects != self._seen_connects:
            # A (re)connect: everything in the outbox up to now is backlog, drained at a bounded
            # rate; rows paho still holds are skipped (paho resends them itself).
            self._seen_connects = self._connects
            self._backlog_end = self._live_after = self.outbox.max_id()
            logger.info("backlog: %d reading(s) to send at %.0f/s", len(self.outbox),
                        self.settings.backlog_rate)
        self._execute(self.flow.handle(publishing.Tick(time.monotonic())))
        room = self.flow.room
        if room <= 0:
            return
        # New readings first: they go out as they come.
        for row in self.outbox.after(self._live_after, 2**62, room):
            self._send(row.id, row.seq, row.payload)
            self._live_after = row.id
            room -= 1
        room = self.flow.room
        holding = self.flow.holding
        while room > 0 and self._backlog_cursor < self._backlog_end and self._tokens >= 1:
            rows = self.outbox.after(self._backlog_cursor, self._backlog_end,
                                     min(room, int(self._tokens)))
            if not rows:
                self._backlog_cursor = self._backlog_end
                break
            for row in rows:
                self._backlog_cursor = row.id
                if row.id in holding:
                    continue
                self._send(row.id, row.seq, row.payload)
                self._tokens -= 1
                room -= 1

    def _send(self, row_id: int, seq: int, payload: bytes) -> None:
        info = self._client.publish(self.topic, payload, qos=1)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise HomeIotError(f"publish failed: {mqtt.error_string(info.rc)}")
        self.flow.handle(publishing.Published(row_id, seq, info.mid, time.monotonic()))
        self.published += 1
