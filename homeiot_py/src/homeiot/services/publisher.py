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

Each row goes out on its own source's topic and is deleted only by a receipt for that source (rows
are known by ``(source, seq)``): after ``SOURCE_DEFAULT`` changed, the rows of the old name still
in the outbox go out as what they are (the broker's ACL must still let this identity write and
read that source's topics, or the refusal is logged at ERROR and they stay). The publisher
subscribes the receipts of every source with rows; a refused SUBSCRIBE (a failure reason code in
the SUBACK, e.g. 0x87 "not authorized") is logged at ERROR once per change, naming the topic and
the reason — no reading can be deleted then — and the SUBSCRIBE is retried every
``_RESUBSCRIBE_EVERY_S``.

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
from homeiot.adapters.outbox import Outbox, OutboxRow
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
_RESUBSCRIBE_EVERY_S = 60.0


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
        self._receipts: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._subacks: queue.Queue[tuple[int, list[ReasonCode]]] = queue.Queue()
        # Pump thread only: receipt topics subscribed on this connection (by SUBSCRIBE mid), and
        # those the broker refused (topic → reason).
        self._receipt_topics: set[str] = set()
        self._subscribing: dict[int, str] = {}
        self.receipt_refusals: dict[str, str] = {}
        self._resubscribe_at = 0.0
        self.flow = PublisherFlow(settings.mqtt.topic, settings.window,  # pump thread only
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
        self._client.on_subscribe = self._on_subscribe
        self._client.on_connect_fail = self._on_connect_fail
        self._report = mqtt_adapter.ConnectionReport(logger, "publisher")
        self._meter_thread = threading.Thread(target=self._meter_loop, name="meter", daemon=True)
        self._watchdog_s = int(os.environ.get("WATCHDOG_USEC", "0")) / 2e6
        self.published = 0
        self.delivered = 0
        self.dead_lettered = 0  # of those deleted, how many the gateway set aside
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
        # The pump subscribes the receipts (before it publishes anything on this connection).
        # Receipts sent while we were away are lost with the clean session: what they named is
        # resent after the receipt timeout, and InfluxDB overwrites it in place.
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
        self._receipts.put((msg.topic, bytes(msg.payload)))
        self._wake.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      reason_codes: list[ReasonCode], properties: Any) -> None:
        self._subacks.put((mid, list(reason_codes)))
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
            logger.info("publisher stopped: published=%d stored=%d dead_lettered=%d waiting=%d",
                        self.published, self.delivered - self.dead_lettered, self.dead_lettered,
                        len(self.outbox))

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
                logger.info("publisher: published=%d stored=%d dead_lettered=%d in_flight=%d "
                            "unreceipted=%d waiting=%d receipt_subscriptions_refused=%d",
                            self.published, self.delivered - self.dead_lettered,
                            self.dead_lettered, self.flow.in_flight, self.flow.unreceipted,
                            len(self.outbox), len(self.receipt_refusals))
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
                topic, payload = self._receipts.get_nowait()
            except queue.Empty:
                break
            try:
                source = receipts.source_of(self.settings.mqtt.receipt_topic, topic)
                body = receipts.decode(payload)
            except InvalidDataError as exc:
                logger.warning("ignoring a bad receipt on %s: %s", topic, exc)
                continue
            actions += self.flow.handle(publishing.Stored(source, body.stored, body.dead))
        self._settle_subacks()
        self._execute(actions)

    def _subscribe_receipts(self, sources: set[str], *, retry: bool = True) -> None:
        """Subscribe the receipts of ``sources`` not yet subscribed on this connection (those the
        broker refused only if ``retry``)."""
        for source in sorted(sources):
            topic = receipt_topic(self.settings.mqtt.receipt_topic, source)
            if topic in self._receipt_topics or (not retry and topic in self.receipt_refusals):
                continue
            rc, mid = self._client.subscribe(topic, qos=1)
            if rc == mqtt.MQTT_ERR_SUCCESS and mid is not None:
                self._receipt_topics.add(topic)
                self._subscribing[mid] = topic

    def _settle_subacks(self) -> None:
        while True:
            try:
                mid, codes = self._subacks.get_nowait()
            except queue.Empty:
                return
            topic = self._subscribing.pop(mid, None)
            if topic is None or not codes:
                continue
            code = codes[0]
            if code.is_failure:
                reason = f"{code} (0x{code.value:02x})"
                self._receipt_topics.discard(topic)  # retried by _publish
                if self.receipt_refusals.get(topic) != reason:
                    logger.error(
                        "the broker refused our subscription to receipts on %s: %s; no reading "
                        "can be deleted until it is granted (they stay in the outbox and are "
                        "resent): may this identity read %s in the broker's ACL? Retrying "
                        "every %.0f s", topic, reason, topic, _RESUBSCRIBE_EVERY_S)
                self.receipt_refusals[topic] = reason
            elif self.receipt_refusals.pop(topic, None) is not None:
                logger.info("the broker granted our subscription to receipts on %s", topic)

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
                            self._send(row)
                case publishing.SetAside(source, seqs):
                    self.dead_lettered += sum(high - low + 1 for low, high in seqs)
                    logger.warning("the gateway set aside reading(s) of %s as dead letters (seq "
                                   "%s): it keeps them (`homeiot-gateway dead-letters` lists "
                                   "them), so they leave the outbox", source,
                                   ", ".join(f"{lo}" if lo == hi else f"{lo}-{hi}"
                                             for lo, hi in seqs[:5])
                                   + (", …" if len(seqs) > 5 else ""))
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
            self._receipt_topics.clear()
            self._subscribing.clear()
            self._subscribe_receipts(self.outbox.sources() | {self.settings.source})
            self._resubscribe_at = time.monotonic() + _RESUBSCRIBE_EVERY_S
            self._backlog_end = self._live_after = self.outbox.max_id()
            logger.info("backlog: %d reading(s) to send at %.0f/s", len(self.outbox),
                        self.settings.backlog_rate)
        if self.receipt_refusals and time.monotonic() >= self._resubscribe_at:
            self._resubscribe_at = time.monotonic() + _RESUBSCRIBE_EVERY_S
            self._subscribe_receipts(self.outbox.sources() | {self.settings.source})
        self._execute(self.flow.handle(publishing.Tick(time.monotonic())))
        room = self.flow.room
        if room <= 0:
            return
        # New readings first: they go out as they come.
        for row in self.outbox.after(self._live_after, 2**62, room):
            self._send(row)
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
                self._send(row)
                self._tokens -= 1
                room -= 1

    def _send(self, row: OutboxRow) -> None:
        # Its own source's topic: the gateway takes the source from the topic, so a row of a
        # former SOURCE_DEFAULT must not go out under the new name.
        if row.source != self.settings.source:
            self._subscribe_receipts({row.source}, retry=False)
        info = self._client.publish(topic_for(self.settings.mqtt.topic, row.source), row.payload,
                                    qos=1)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise HomeIotError(f"publish failed: {mqtt.error_string(info.rc)}")
        self.flow.handle(publishing.Published(row.id, row.source, row.seq, info.mid,
                                              time.monotonic()))
        self.published += 1
