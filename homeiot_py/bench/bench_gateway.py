"""Benchmark: how fast the gateway drains a preloaded backlog, against paho and the C client.

Every consumer drains the same backlog of persistent-session QoS 1 messages from a real Mosquitto,
so the publisher's speed does not matter:

  (a) ``mosquitto_sub -q 1 -c`` — the C client, the practical ceiling;
  (b) a bare paho subscriber that only acknowledges — the ceiling for any paho-based consumer;
  (c) the gateway (a ``python -m homeiot.cli.gateway`` process), end to end into InfluxDB, with
      its receipts (end-to-end acks) on; ``lost=`` and ``dup=`` count the rows InfluxDB holds by
      seq, after the drain ended or stalled — never what the gateway received.

(b) and (c) run interleaved — paho, gateway, paho, gateway, paho — each round on a session of
its own holding the same backlog (each gateway round with its own database, so its lost=/dup=
are its own), and ``ratio_paho`` is the median gateway round over the median paho round: this
shared 2-core machine's speed drifts by tens of percent within a minute (one paho round ranged
5,300-14,700/s across runs), so a reference taken once, or far from the gateway, says more
about the machine than about the gateway. Every round is printed.

Then, at 100 readings/s, the p99 latency from publish to queryable, and the gateway's peak RSS.
Prints one summary line; asserts nothing about time.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from tests.conftest import USERS, mqtt_settings
from tests.gateway_support import (
    Publisher,
    count_points,
    gateway_settings,
    reading,
    start_connected_gateway,
    stored_seqs,
    wait_until,
)
from tests.services import (
    BASE_TOPIC,
    LOOPBACK,
    Mosquitto,
    make_pki,
    mosquitto_client_env,
    require_binary,
    start_influxd,
    start_mosquitto,
    vm_hwm_mb,
)

from homeiot.adapters import mqtt as mqtt_adapter
from homeiot.adapters.influx import InfluxClient
from homeiot.config import GatewaySettings, InfluxSettings
from homeiot.core.reading import epoch_ms

N = int(os.environ.get("BENCH_GATEWAY_MSGS", "50000"))
LATENCY_RATE_HZ = 100
LATENCY_SECONDS = 20
RECEIVE_MAXIMUM = 10_000  # what the gateway asks for with its default batch size of 5000
TOPIC_FILTER = f"{BASE_TOPIC}/+"


def c_args(broker: Mosquitto) -> list[str]:
    return [require_binary("mosquitto_sub"), "-h", LOOPBACK, "-p", str(broker.port), "--cafile",
            str(broker.pki.ca_cert), "-V", "mqttv5", "-q", "1", "-c", "-i", "bench-c",
            "-x", "86400", "-t", TOPIC_FILTER]


def c_register(broker: Mosquitto, env: dict[str, str]) -> None:
    subprocess.run([*c_args(broker), "-W", "1"], env=env, capture_output=True, check=False,
                   timeout=30)


def c_drain(broker: Mosquitto, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([*c_args(broker), "-C", str(N)], env=env, stdout=subprocess.DEVNULL,
                   check=True, timeout=600)
    return N / (time.perf_counter() - start)


PAHO_ROUNDS = 3


def paho_session(broker: Mosquitto, client_id: str, on_message: Any = None) -> mqtt.Client:
    settings = replace(mqtt_settings(broker, "gateway"), session_expiry_s=86400)
    client = mqtt_adapter.create_client(settings, client_id=client_id, manual_ack=True)
    if on_message is not None:
        client.on_message = on_message
    mqtt_adapter.connect(client, settings, clean_start=False, receive_maximum=RECEIVE_MAXIMUM)
    mqtt_adapter.start(client)
    return client


def paho_register(broker: Mosquitto, client_id: str) -> None:
    client = paho_session(broker, client_id)
    done = threading.Event()
    client.on_subscribe = lambda *a: done.set()
    client.subscribe(TOPIC_FILTER, qos=1)
    done.wait(10)
    mqtt_adapter.close(client)


def paho_drain(broker: Mosquitto, client_id: str) -> float:
    received = 0
    done = threading.Event()

    def on_message(c: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        nonlocal received
        c.ack(msg.mid, msg.qos)
        received += 1
        if received >= N:
            done.set()

    start = time.perf_counter()
    client = paho_session(broker, client_id, on_message)
    if not done.wait(600):
        raise RuntimeError(f"bare paho received only {received} of {N}")
    rate = N / (time.perf_counter() - start)
    mqtt_adapter.close(client)
    return rate


def latency_p99_ms(publisher: Publisher, influx: InfluxSettings, first_seq: int) -> float:
    """Publish at 100 Hz; a poller records when each reading first becomes queryable."""
    sent: dict[int, float] = {}
    seen: dict[int, float] = {}
    count = LATENCY_RATE_HZ * LATENCY_SECONDS
    stop = threading.Event()
    newest_ms = epoch_ms(reading(first_seq, step_ms=10).ts) - 1

    def poll() -> None:
        nonlocal newest_ms
        with InfluxClient(influx) as client:
            while not stop.is_set():
                for row in client.rows('SELECT "seq" FROM "meter_readings" WHERE time > '
                                       f"{newest_ms}ms"):
                    now = time.perf_counter()
                    seen.setdefault(row["seq"], now)
                    newest_ms = max(newest_ms, row["time"])
                time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    next_at = time.perf_counter()
    for seq in range(first_seq, first_seq + count):
        sent[seq] = time.perf_counter()
        publisher.publish_readings([reading(seq, step_ms=10)])
        next_at += 1 / LATENCY_RATE_HZ
        time.sleep(max(0.0, next_at - time.perf_counter()))
    publisher.wait_all()
    wait_until(lambda: len(seen) >= count, 30, "every latency reading")
    stop.set()
    poller.join()
    latencies = sorted((seen[s] - sent[s]) * 1000 for s in sent)
    return latencies[int(0.99 * (len(latencies) - 1))]


def drain(influx: InfluxSettings, started: float, *, stall_s: float = 20.0,
          limit_s: float = 600.0) -> tuple[float, int]:
    """When the gateway's drain ended and how many readings were stored by then: all of them, or
    what was there when no new row came for ``stall_s`` (a loss then shows in ``lost=`` and in a
    rate over the readings stored only; it does not hang or raise).

    Every 20 ms a probe asks whether the newest reading (seq N-1) is stored — one point's time
    range, cheap for influxd; the full count (about 16 ms of influxd's CPU at 50,000 points, so
    some 40 % of one of the machine's two cores when it ran every 20 ms, competing with the
    gateway and never with the paho reference) runs when the probe finds it, and every 0.5 s for
    the stall check. The drain ended when a full count reaches N: its start is the end time, as
    before."""
    newest_ms = epoch_ms(reading(N - 1, step_ms=10).ts)
    last_count, last_change, last_full = -1, time.perf_counter(), 0.0
    with InfluxClient(influx) as client:
        while True:
            now = time.perf_counter()
            newest = next(client.rows('SELECT count("seq") FROM "meter_readings" WHERE '
                                      f"time >= {newest_ms}ms"), None)
            if newest is not None or now - last_full >= 0.5:
                now = last_full = time.perf_counter()
                count = count_points(influx)
                if count >= N:
                    return now, count
                if count != last_count:
                    last_count, last_change = count, now
                elif now - last_change > stall_s or now - started > limit_s:
                    print(f"drain stalled at {count} of {N}", file=sys.stderr)
                    return last_change, last_count
            time.sleep(0.02)


GATEWAY_ROUNDS = 2


def gateway_round(settings: GatewaySettings, log: Path) -> tuple[float, int, int, float]:
    """One gateway drain of its own session's backlog into its own database: (rate, lost, dup,
    the gateway's peak RSS in MB). ``lost``/``dup`` count the rows InfluxDB holds by seq; a
    round that stalled is rated by what it stored. The gateway is stopped afterwards, so the
    next paho round has the machine to itself as the others had."""
    # Timed from the gateway's CONNACK, so Python's start-up is not counted against it.
    gw = start_connected_gateway(settings, log, interval_s=0.005)
    started = time.perf_counter()
    finished, stored = drain(settings.influx, started)
    rss = vm_hwm_mb(gw.pid)
    stop(gw)
    seqs = stored_seqs(settings.influx)  # the rows InfluxDB holds, not what the gateway received
    unique = {s for s in seqs if 0 <= s < N}
    return stored / (finished - started), N - len(unique), len(seqs) - len(set(seqs)), rss


def stop(gw: subprocess.Popen[bytes]) -> None:
    gw.send_signal(signal.SIGTERM)
    gw.wait(15)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        root = Path(tmp)
        broker = start_mosquitto(root / "broker", make_pki(root / "pki"), USERS)
        influxd = start_influxd(root / "influxd")
        try:
            # One session and one database per gateway round, so each round's lost=/dup= are
            # its own.
            gateways = []
            for i in range(GATEWAY_ROUNDS):
                influxd.admin(f'CREATE DATABASE "bench{i}"')
                influx = InfluxSettings(url=influxd.url, database=f"bench{i}")
                settings = gateway_settings(broker, influx, root, client_id=f"bench-gw-{i}",
                                            batch_size=5000, batch_age_s=0.5)
                gateways.append(replace(settings, mqtt=replace(settings.mqtt,
                                                               session_expiry_s=86400)))
            c_env = mosquitto_client_env(root, "mosquitto_sub", "gateway", USERS["gateway"])
            # Register the persistent sessions, then preload the backlog.
            c_register(broker, c_env)
            paho_ids = [f"bench-paho-{i}" for i in range(PAHO_ROUNDS)]
            for client_id in paho_ids:
                paho_register(broker, client_id)
            log = root / "gateway.log"
            for settings in gateways:
                registering = start_connected_gateway(settings, log)
                time.sleep(0.5)  # subscribed
                stop(registering)
            publisher = Publisher(broker, "meter1")
            for start in range(0, N, 5000):
                publisher.publish_readings(reading(i, step_ms=10) for i in range(start,
                                                                                 min(N, start + 5000)))
                publisher.wait_all()
            print(f"preloaded {N} readings for {PAHO_ROUNDS + GATEWAY_ROUNDS + 1} sessions",
                  file=sys.stderr)

            c_rate = c_drain(broker, c_env)
            # Interleaved (paho, gateway, paho, gateway, paho): this machine's speed drifts by
            # tens of percent within a minute, so each reference is taken next to the gateway.
            paho_rates = [paho_drain(broker, paho_ids[0])]
            rates: list[float] = []
            lost = dup = 0
            rss = 0.0
            for i, settings in enumerate(gateways):
                rate, round_lost, round_dup, round_rss = gateway_round(settings, log)
                rates.append(rate)
                lost += round_lost
                dup += round_dup
                rss = max(rss, round_rss)
                paho_rates.append(paho_drain(broker, paho_ids[i + 1]))
            rate = statistics.median(rates)
            paho_rate = statistics.median(paho_rates)

            # The last gateway again (its session drained) for the latency; RSS is the peak of
            # every gateway process.
            gw = start_connected_gateway(gateways[-1], log)
            p99 = latency_p99_ms(publisher, gateways[-1].influx, N)
            rss = max(rss, vm_hwm_mb(gw.pid))
            stop(gw)
            publisher.close()
        finally:
            broker.process.stop()
            influxd.process.stop()
    rounds = "/".join(f"{r:.0f}" for r in paho_rates)
    gw_rounds = "/".join(f"{r:.0f}" for r in rates)
    print(f"gateway_bench msgs={N} rate={rate:.0f} rounds={gw_rounds} paho_rate={paho_rate:.0f} "
          f"paho_rounds={rounds} c_rate={c_rate:.0f} "
          f"ratio_paho={rate / paho_rate:.2f} ratio_c={rate / c_rate:.2f} lost={lost} dup={dup} "
          f"p99_ms={p99:.0f} rss_mb={rss:.1f}")


if __name__ == "__main__":
    main()
