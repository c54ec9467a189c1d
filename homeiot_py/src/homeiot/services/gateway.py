"""The gateway: MQTT → InfluxDB with at-least-once delivery.

Messages arrive on paho's network thread, are decoded at once (``core``) and fed to the delivery
state machine (:mod:`homeiot.core.batching`), which batches them and decides what to write, what
to set aside and what to acknowledge. A writer thread carries out its actions: it writes each batch
to InfluxDB and only then queues its messages' acknowledgements, in arrival order (MQTT v5,
``manual_ack``). paho's thread sends them before it handles the next message (as a bare paho
consumer does: the writer does not compete with it for the GIL once per PUBACK), the writer only
when no message came for ``_ACK_HANDOVER_S``; never on a connection other than the one that
delivered them. The session is persistent (fixed client id,
``clean_start=False``, a session expiry), so what is published while the gateway is down waits in
the broker. ``Receive Maximum`` caps the unacknowledged messages the broker sends us, which bounds
memory while InfluxDB is down: the backlog stays in the broker.

Invalid payloads become dead letters (stored before they are acknowledged); a batch that InfluxDB
refuses in part has its refused lines set aside the same way. Nothing is acknowledged that is not
stored somewhere durable. Receipts name both (stored, dead-lettered), so a publisher stops
resending a reading once it is durable here either way.

The broker's answers are read: a SUBSCRIBE it refuses (a failure code in the SUBACK) and a
receipt it refuses (a failure code in the PUBACK, e.g. 0x87 when the ACL does not let the gateway
write the receipt tree) are logged at ERROR once per change, naming the topic and the reason, and
``/readyz`` says so until they are accepted again (the SUBSCRIBE is retried every
``RESUBSCRIBE_EVERY_S``).
"""

from __future__ import annotations

import collections
import logging
import queue
import random
import ssl
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from homeiot.adapters import mqtt as mqtt_adapter
from homeiot.adapters.deadletters import DeadLetter, DeadLetterStore
from homeiot.adapters.influx import InfluxClient
from homeiot.config import GatewaySettings
from homeiot.core import batching, receipts, status, writes
from homeiot.core.batching import GatewayFlow
from homeiot.core.errors import HomeIotError
from homeiot.core.ingest import Rejection, Rules, ingest
from homeiot.core.receipts import receipt_topic
from homeiot.core.topics import subscription_filter

logger = logging.getLogger(__name__)

#: How long a clean shutdown may spend flushing before it gives up (the rest is redelivered).
SHUTDOWN_FLUSH_S = 8.0
_BACKOFF_MIN_S = 0.5
_BACKOFF_MAX_S = 10.0


#: How often the gateway stores its health signals for the alerts (core/status.py).
STATUS_EVERY_S = 60.0
#: How often a SUBSCRIBE the broker refused is tried again.
RESUBSCRIBE_EVERY_S = 30.0
#: Receipts awaiting their PUBACK that the gateway remembers (by message id) to name a refusal.
_RECEIPTS_TRACKED = 10_000
#: Acknowledgements go out on paho's network thread, before it handles the next message; when no
#: message came for this long (the stream is idle, or the broker waits for these very acks: Receive
#: Maximum), the writer sends them itself. Far longer than the GIL's switch interval (5 ms): while
#: the writer runs Python (settling a batch), paho's thread waits up to that long for the GIL, and
#: a 5 ms handover made the writer take over the acks mid-stream, one socketpair wake-up of paho's
#: thread per ack (bench-gateway: the writer sent most batches' acks and the drain ran at
#: 7,400-8,000/s; at 50 ms paho's thread sent every batch's, 9,900/s).
_ACK_HANDOVER_S = 0.05


def broker_cert_not_after(client: mqtt.Client) -> float | None:
    """When the certificate the broker presented on ``client``'s connection expires (epoch s)."""
    sock = client.socket()
    if not isinstance(sock, ssl.SSLSocket):
        return None
    cert = sock.getpeercert()
    not_after = cert.get("notAfter") if cert else None
    return float(ssl.cert_time_to_seconds(str(not_after))) if not_after else None


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


class _Received(Collector):
    """``homeiot_messages_received_total``, read when scraped from a plain count that paho's
    thread keeps (a Prometheus counter's lock per message cost ~2 % of the gateway's drain)."""

    def __init__(self) -> None:
        self.count = 0  # paho's network thread is the only writer

    def collect(self) -> Any:
        yield CounterMetricFamily("homeiot_messages_received", "MQTT messages received",
                                  value=self.count)


class GatewayMetrics:
    """The gateway's Prometheus metrics, in a registry of its own."""

    def __init__(self, last_reading: dict[str, datetime], clock: Callable[[], datetime]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = _Received()
        r.register(self.received)
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
        self.stored_by_source = Counter("homeiot_source_points_written",
                                        "Points accepted by InfluxDB, per source", ["source"],
                                        registry=r)
        self.dead_by_source = Counter("homeiot_source_dead_letters",
                                      "Dead letters per source (topic's last level)", ["source"],
                                      registry=r)
        self.seq_gaps = Counter("homeiot_source_seq_gaps",
                                "Readings skipped in a source's seq as received (a backlog may "
                                "fill them later)", ["source"], registry=r)
        self.unacked = Gauge("homeiot_source_unacked_messages",
                             "Messages received but not yet acknowledged, per source",
                             ["source"], registry=r)
        r.register(_LastReadingAge(last_reading, clock))


class Gateway:
    """Consume readings from MQTT and store them in InfluxDB; see the module docstring."""

    def __init__(self, settings: GatewaySettings, influx: InfluxClient,
                 dead_letters: DeadLetterStore, *,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 on_fatal: Callable[[str], None] | None = None,
                 stall_retry_s: float = writes.STALL_RETRY_S) -> None:
        self.settings = settings
        self.influx = influx
        self.dead_letters = dead_letters
        self._clock = clock
        self._on_fatal = on_fatal
        self._stall_retry_s = stall_retry_s
        self._rules = Rules(settings.mqtt.topic, settings.influx.measurement,
                            timedelta(seconds=settings.max_future_s))
        self._topic_filter = subscription_filter(settings.mqtt.topic, settings.share_group)
        self.last_reading: dict[str, datetime] = {}
        self.metrics = GatewayMetrics(self.last_reading, clock)
        self.fatal_error: str | None = None
        self.exit_code = 0
        self.heartbeat = 0.0
        self.mqtt_problem: str | None = None
        self.subscribe_problem: str | None = None
        self.receipt_problem: str | None = None
        self._receipt_reason: str | None = None
        self._pubacks: queue.Queue[tuple[int, ReasonCode]] = queue.Queue()
        self._receipt_mids: dict[int, str] = {}  # writer thread only: receipt mid → its topic
        self._last_seq: dict[str, int] = {}
        self._gauged: set[str] = set()
        self.mqtt_connected = False
        # When the certificate the broker presented expires (epoch seconds), for the alert.
        self.broker_cert_not_after: float | None = None
        self._last_status = 0.0
        self._status_problem: str | None = None
        self.influx_ok = True
        self.influx_problem: str | None = None
        self._influx_key: str | None = None
        # The broker sends at most this many unacknowledged messages: two batches, so one fills
        # while the other is written.
        self.receive_maximum = min(65535, 2 * settings.batch_size)

        self._lock = threading.Lock()  # guards the flow: paho's thread and the writer feed it
        # Acks the flow decided, each with the connection generation it was decided on. paho's
        # thread sends them (it handles connects and disconnects itself, so its check of the
        # generation cannot race one); the writer only when no message came for a while.
        self._acks: collections.deque[tuple[int, int, int]] = collections.deque()
        self._last_message_at = 0.0  # monotonic; paho's thread writes it, the writer reads it
        self._ack_lock = threading.Lock()  # one sender at a time: PUBACKs go out in order
        self.flow = GatewayFlow(settings.batch_size, settings.batch_age_s)
        self._ready: queue.Queue[batching.Action] = queue.Queue()
        self._stopping = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name="gateway-writer", daemon=True)
        self._client = mqtt_adapter.create_client(settings.mqtt, client_id=settings.client_id,
                                                  manual_ack=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish
        self._client.on_connect_fail = self._on_connect_fail
        self._report = mqtt_adapter.ConnectionReport(logger, "gateway")

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect (in the background, retrying by itself) and start consuming."""
        s = self.settings.mqtt
        logger.info("gateway starting: broker=%s:%s client_id=%s subscription=%s batch=%d/%.2fs",
                    s.host, s.port, self.settings.client_id, self._topic_filter,
                    self.settings.batch_size, self.settings.batch_age_s)
        if self.dead_letters.problem:
            logger.error("%s", self.dead_letters.problem)
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
        logger.info("gateway stopped: pending=%d", self.pending)

    @property
    def stopped(self) -> bool:
        return self._stopping.is_set()

    @property
    def pending(self) -> int:
        """Messages received and not yet settled (acknowledged or left to the broker)."""
        with self._lock:
            return self.flow.pending

    # --- paho callbacks (network thread) --------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Any) -> None:
        if reason.is_failure:
            self.mqtt_problem = mqtt_adapter.refusal(reason)
            self._report.failed(self.mqtt_problem)
            if reason.value in mqtt_adapter.AUTH_REASONS:
                self._fatal(f"the broker refused our credentials ({reason}); check MQTT_USER/"
                            "MQTT_PASSWORD or MQTT_BROKER_URL")
            return
        with self._lock:
            self.flow.handle(batching.Connected())  # acks of earlier connections are void now
        self.mqtt_connected = True
        self.mqtt_problem = None
        self._report.connected()
        self.broker_cert_not_after = broker_cert_not_after(client)
        if not flags.session_present:
            logger.warning("broker had no session for %s: messages published while we were away "
                           "(if any) were not kept", self.settings.client_id)
        client.subscribe(self._topic_filter, qos=1)
        logger.info("connected: session_present=%s", flags.session_present)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      reason_codes: list[ReasonCode], properties: Any) -> None:
        # The gateway subscribes one filter only, so every SUBACK is about it.
        failed = [code for code in reason_codes if code.is_failure]
        if failed:
            problem = (f"the broker refused our subscription to {self._topic_filter}: "
                       f"{failed[0]} (0x{failed[0].value:02x}); no reading arrives until it is "
                       "granted: may the gateway's identity read it in the broker's ACL? "
                       f"Retrying every {RESUBSCRIBE_EVERY_S:.0f} s")
            if problem != self.subscribe_problem:
                logger.error("%s", problem)
            self.subscribe_problem = problem
        elif self.subscribe_problem is not None:
            self.subscribe_problem = None
            logger.info("the broker granted our subscription to %s", self._topic_filter)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Any) -> None:
        # paho calls this holding its message lock: hand over, the writer thread reads it.
        self._pubacks.put((mid, reason))

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self.mqtt_problem = mqtt_adapter.diagnose(self.settings.mqtt)
        self._report.failed(self.mqtt_problem)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Any) -> None:
        with self._lock:  # from now on nothing of that connection is acknowledged
            self.flow.handle(batching.Disconnected())
        self.mqtt_connected = False
        self.mqtt_problem = f"disconnected: {reason}"
        if not self._stopping.is_set():
            logger.warning("disconnected from the broker: %s; reconnecting", reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # paho issue #472: callbacks registered per "$share/..." filter never fire, so every
        # message comes through this one on_message.
        now = self._last_message_at = time.monotonic()
        if self._acks and self._ack_lock.acquire(blocking=False):  # else the writer sends them
            try:
                self._send_acks(self.flow.generation)  # paho's thread: the generation is settled
            finally:
                self._ack_lock.release()
        payload = msg.payload if isinstance(msg.payload, bytes) else bytes(msg.payload)
        message = self._ingest(msg.mid, msg.qos, msg.topic, payload, self._clock())
        self.metrics.received.count += 1
        if message.source is not None and message.seq is not None:
            last = self._last_seq.get(message.source)
            if last is not None and message.seq > last + 1:
                self.metrics.seq_gaps.labels(message.source).inc(message.seq - last - 1)
            if last is None or message.seq > last:
                self._last_seq[message.source] = message.seq
        with self._lock:
            actions = self.flow.handle(batching.Received(message, now))
        for action in actions:
            self._ready.put(action)  # a full batch: Write or DeadLetter

    def _ingest(self, mid: int, qos: int, topic: str, payload: bytes,
                received_at: datetime) -> batching.Message:
        outcome = ingest(self._rules, topic, payload, received_at)
        if isinstance(outcome, Rejection):
            return batching.Message(mid, qos, topic, payload, received_at,
                                    source=outcome.source, seq=outcome.seq,
                                    rejection=outcome.reason)
        return batching.Message(mid, qos, topic, payload, received_at, outcome.line,
                                outcome.source, outcome.seq, outcome.ts)

    # --- writer thread --------------------------------------------------------------------------

    def _write_loop(self) -> None:
        try:
            self._write_loop_inner()
        except BaseException as exc:  # a dead writer must stop the process, never go quiet
            logger.critical("the writer thread died: %s: %s; nothing more is acknowledged, "
                            "stopping", type(exc).__name__, exc, exc_info=True)
            self._fatal(f"the writer thread died: {type(exc).__name__}: {exc}", exit_code=1)

    def _write_loop_inner(self) -> None:
        age = self.settings.batch_age_s
        last_gauges = last_subscribe = 0.0
        deadline: float | None = None
        while True:
            stopping = self._stopping.is_set()
            if stopping and deadline is None:
                deadline = time.monotonic() + SHUTDOWN_FLUSH_S
            try:
                wait = 0 if stopping else _ACK_HANDOVER_S if self._acks else min(age / 4, 0.05)
                actions: list[batching.Action] = [self._ready.get(timeout=wait)]
            except queue.Empty:
                with self._lock:
                    actions = self.flow.handle(batching.Tick(time.monotonic(), flush=stopping))
                if not actions and stopping and self._ready.empty():
                    self._send_acks_here()
                    return
            self.heartbeat = time.monotonic()
            if not self._carry_out(actions, deadline):
                return  # the write that ran out of time sent the acks queued before it
            if self._acks and (stopping or time.monotonic() - self._last_message_at
                               >= _ACK_HANDOVER_S):
                self._send_acks_here()
            self._settle_receipt_acks()
            self.heartbeat = time.monotonic()
            if self.subscribe_problem and self.mqtt_connected and not stopping and \
                    self.heartbeat - last_subscribe >= RESUBSCRIBE_EVERY_S:
                last_subscribe = self.heartbeat
                self._client.subscribe(self._topic_filter, qos=1)
            self.metrics.backlog.set(self.pending)
            if self.heartbeat - self._last_status >= STATUS_EVERY_S and not stopping:
                self._last_status = self.heartbeat
                self.write_status()
            if self.heartbeat - last_gauges >= 1.0:
                last_gauges = self.heartbeat
                with self._lock:
                    by_source = self.flow.pending_by_source()
                seen = set(self._last_seq.copy())  # copy(): atomic, paho's thread adds to it
                for source in set(by_source) | self._gauged | seen:
                    self.metrics.unacked.labels(source).set(by_source.get(source, 0))
                self._gauged |= set(by_source)

    def write_status(self) -> None:
        """Store the gateway's health signals for Grafana's alerts (core/status.py): the dead
        letters held and the days left on the broker's certificate. A failure is logged once
        per change and never stops the gateway: the readings matter more than their monitor."""
        now = self._clock()
        fields: dict[str, float] = {}
        try:
            fields["dead_letters"] = self.dead_letters.count()
            if self.broker_cert_not_after is not None:
                fields["broker_cert_days_left"] = round(
                    (self.broker_cert_not_after - now.timestamp()) / 86_400, 2)
            self.influx.write([status.status_line("gateway", now, **fields)])
        except HomeIotError as exc:
            problem = f"{type(exc).__name__}: {exc}"
            if problem != self._status_problem:
                logger.warning("cannot store the gateway's status for the alerts: %s", problem)
            self._status_problem = problem
            return
        if self._status_problem is not None:
            logger.info("the gateway's status is stored again")
        self._status_problem = None

    def _carry_out(self, actions: list[batching.Action], deadline: float | None) -> bool:
        """Carry out the flow's actions (and those they lead to); False when shutdown's deadline
        passed first (nothing more is acknowledged: the broker redelivers)."""
        todo = collections.deque(actions)
        with self._lock:
            generation = self.flow.generation
        acks = self._acks
        while todo:
            action = todo.popleft()
            if type(action) is batching.Ack:  # one per message: the common action, first
                acks.append((generation, action.mid, action.qos))
                continue
            match action:
                case batching.Write(batch_id, lines):
                    if acks:  # settled batches' first: this write may take long (InfluxDB
                        # down), and with Receive Maximum reached no message comes to carry them
                        self._send_acks_here()
                    started = time.monotonic()
                    written = self._write(batch_id, list(lines), deadline)
                    if written is None:
                        return False
                    self.metrics.batch_latency.observe(time.monotonic() - started)
                    with self._lock:
                        todo.extendleft(reversed(self.flow.handle(written)))
                        generation = self.flow.generation
                case batching.DeadLetter(batch_id, letters):
                    self.dead_letters.add([DeadLetter(lt.topic, lt.payload, lt.error,
                                                      lt.received_at) for lt in letters])
                    self.metrics.dead.inc(len(letters))
                    for letter in letters:
                        self.metrics.dead_by_source.labels(letter.topic.rsplit("/", 1)[-1]).inc()
                    logger.warning("dead letters: %d (first: topic=%s error=%s)", len(letters),
                                   letters[0].topic, letters[0].error)
                    with self._lock:
                        todo.extendleft(reversed(self.flow.handle(
                            batching.DeadLettered(batch_id))))
                        generation = self.flow.generation
                case batching.Receipt(source, ranges, dead):
                    # QoS 1; if it is lost, the publisher resends and we store and say it again.
                    self._send_receipt(source, ranges, dead)
                case batching.Settled(_, stored, _, _):
                    self._count_stored(stored)
        return True

    def _count_stored(self, stored: tuple[batching.Message, ...]) -> None:
        """Metrics of a settled batch: points written, per source, and the newest reading."""
        self.metrics.written.inc(len(stored))
        per_source: dict[str, int] = {}
        for message in stored:
            if message.source is None or message.ts is None:
                continue  # stored messages always have both; typing cannot tell
            per_source[message.source] = per_source.get(message.source, 0) + 1
            newest = self.last_reading.get(message.source)
            if newest is None or message.ts > newest:
                self.last_reading[message.source] = message.ts
        for source, count in per_source.items():
            self.metrics.stored_by_source.labels(source).inc(count)

    def _send_acks_here(self) -> None:
        """The writer sends the queued acks (no message came to carry them, or shutting down)."""
        with self._ack_lock, self._lock:
            self._send_acks(self.flow.generation)

    def _send_acks(self, generation: int) -> None:
        """Send the queued acks that belong to connection ``generation``; drop the others (the
        broker delivers their messages again). Called holding ``_ack_lock``: each ack is popped
        and sent by one thread, in the order the flow decided them."""
        acks = self._acks
        while True:
            try:
                decided_on, mid, qos = acks.popleft()
            except IndexError:
                return
            if decided_on == generation:
                self._client.ack(mid, qos)

    def _send_receipt(self, source: str, stored: receipts.Ranges, dead: receipts.Ranges) -> None:
        topic = receipt_topic(self.settings.mqtt.receipt_topic, source)
        info = self._client.publish(topic, receipts.encode(stored, dead), qos=1)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: queued
            self._receipt_refused(topic, mqtt.error_string(info.rc))
            return
        if len(self._receipt_mids) >= _RECEIPTS_TRACKED:  # PUBACKs that never came (a drop)
            del self._receipt_mids[next(iter(self._receipt_mids))]
        self._receipt_mids[info.mid] = topic

    def _settle_receipt_acks(self) -> None:
        """Read the broker's answers to our receipts (PUBACKs, on the writer thread)."""
        while True:
            try:
                mid, reason = self._pubacks.get_nowait()
            except queue.Empty:
                return
            topic = self._receipt_mids.pop(mid, None)
            if topic is None:
                continue
            if reason.is_failure:  # 0x10 "no matching subscribers" is not: the Pi is away
                self._receipt_refused(topic, f"{reason} (0x{reason.value:02x})")
            elif self.receipt_problem is not None:
                self.receipt_problem = self._receipt_reason = None
                logger.info("the broker accepts our receipts again (%s)", topic)

    def _receipt_refused(self, topic: str, reason: str) -> None:
        """Report a refused receipt once per change of reason (not of topic: every source's
        receipt is refused alike when the ACL lacks the tree), and tell /readyz."""
        if reason != self._receipt_reason:
            logger.error("the broker refused our receipt on %s: %s; publishers keep their "
                         "readings and resend them: may the gateway's identity write %s/# in "
                         "the broker's ACL?", topic, reason, self.settings.mqtt.receipt_topic)
        self._receipt_reason = reason
        self.receipt_problem = (f"the broker refused our receipt on {topic}: {reason}; "
                                "publishers keep their readings and resend them")

    def _write(self, batch_id: int, lines: list[str],
               deadline: float | None) -> batching.Written | None:
        """Store ``lines`` following InfluxDB's answers (:mod:`homeiot.core.writes`); the answer
        for the flow names what InfluxDB refused for good. None when shutdown's deadline passed
        first (nothing is acknowledged then)."""
        reasons: list[str] = []
        refused = self._store(lines, deadline, reasons)
        if refused is None:
            return None
        return batching.Written(batch_id, frozenset(refused), reason="; ".join(reasons[:3]))

    def _store(self, lines: list[str], deadline: float | None,
               reasons: list[str]) -> set[str] | None:
        delay: float | None = None
        while True:
            answer = self.influx.write_answer(lines)
            decision = writes.policy(answer)
            if decision is writes.Policy.PARTIAL and not set(answer.refused) <= set(lines):
                decision = writes.Policy.ISOLATE  # it named lines we cannot match: find them
            if decision is writes.Policy.WRITTEN:
                self._influx_answering()
                return set()
            if decision is writes.Policy.PARTIAL:
                self._influx_answering()
                reasons.append(answer.text)
                return set(answer.refused)
            if decision in (writes.Policy.SPLIT, writes.Policy.ISOLATE):
                self._influx_answering()
                if len(lines) == 1:
                    reasons.append(answer.text)
                    return set(lines)
                half = len(lines) // 2
                first = self._store(lines[:half], deadline, reasons)
                if first is None:
                    return None
                second = self._store(lines[half:], deadline, reasons)
                return None if second is None else first | second
            self.metrics.write_errors.inc()
            if decision is writes.Policy.STALL:
                wait = self._stall_retry_s
                self._influx_refusing(f"InfluxDB refuses to store anything ({answer.text}); "
                                      "nothing is acknowledged, retrying every "
                                      f"{wait:.0f} s", key=str(answer.status))
            else:
                delay = writes.backoff(delay)
                wait = delay * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not secrecy
                self._influx_refusing(f"InfluxDB write failed, {len(lines)} points held (not "
                                      f"acknowledged), retrying with backoff: {answer.text}",
                                      key=str(answer.status), level=logging.WARNING)
            if deadline is not None and time.monotonic() + wait > deadline:
                return None
            if self._stopping.wait(wait) and deadline is None:
                deadline = time.monotonic() + SHUTDOWN_FLUSH_S

    def _influx_refusing(self, message: str, *, key: str, level: int = logging.ERROR) -> None:
        """Report a write problem once per change (``key``), and tell /readyz."""
        self.influx_ok = False
        self.influx_problem = message
        if key != self._influx_key:
            self._influx_key = key
            logger.log(level, "%s", message)

    def _influx_answering(self) -> None:
        if self._influx_key is not None:
            logger.info("InfluxDB stores again")
            self._influx_key = None
        self.influx_ok = True
        self.influx_problem = None

    def problems(self, stall_s: float = 60.0) -> list[str]:
        """Why the gateway is not ready, if it is not (for /readyz)."""
        reasons = []
        if self.fatal_error:
            reasons.append(self.fatal_error)
        elif not self._writer.is_alive() and self._writer.ident is not None:
            reasons.append("the writer thread is not running")
        elif self.heartbeat and time.monotonic() - self.heartbeat > stall_s and self.pending:
            reasons.append(f"the writer has made no progress for {stall_s:.0f} s "
                           f"({self.pending} messages waiting)")
        if self.dead_letters.problem:
            reasons.append(self.dead_letters.problem)
        if self.influx_problem:
            reasons.append(self.influx_problem)
        if self.subscribe_problem:
            reasons.append(self.subscribe_problem)
        if self.receipt_problem:
            reasons.append(self.receipt_problem)
        if not self.mqtt_connected:
            reasons.append(f"not connected to the broker: {self.mqtt_problem or 'connecting'}")
        return reasons

    def _fatal(self, message: str, exit_code: int = 3) -> None:
        self.exit_code = exit_code
        self.fatal_error = message
        if self._on_fatal is not None:
            self._on_fatal(message)
