"""``homeiot-gateway`` / ``python -m homeiot.cli.gateway``: run the gateway, or manage dead letters.

Exit codes: 0 clean stop, 1 a thread died (the writer: e.g. the dead-letter store cannot be
written), 2 bad configuration, 3 the broker refused our credentials.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta

from homeiot.adapters.deadletters import DeadLetterStore
from homeiot.adapters.influx import InfluxClient
from homeiot.config import load_gateway
from homeiot.core import writes
from homeiot.core.errors import ConfigError, HomeIotError, InfluxUnavailableError
from homeiot.core.ingest import Rejection, Rules, ingest
from homeiot.logs import setup_logging

logger = logging.getLogger("homeiot.gateway")

EXIT_CONFIG = 2
EXIT_AUTH = 3


def _run() -> int:
    import uvicorn  # noqa: PLC0415 - only the serving command needs the web stack

    from homeiot.services.api import ApiContext, create_app  # noqa: PLC0415
    from homeiot.services.gateway import Gateway  # noqa: PLC0415

    _Server = _server_class()  # noqa: N806 - a class
    settings = load_gateway()
    influx = InfluxClient(settings.influx)
    store = DeadLetterStore(settings.dead_letter_db)
    server: uvicorn.Server | None = None

    def on_fatal(message: str) -> None:
        logger.error("fatal: %s", message)
        if server is not None:
            server.should_exit = True

    gateway = Gateway(settings, influx, store, on_fatal=on_fatal)
    app = create_app(ApiContext(
        influx=influx, dead_letters=store, registry=gateway.metrics.registry,
        tokens=settings.api_tokens, measurement=settings.influx.measurement,
        timezone=settings.timezone, source_default=settings.source_default,
        mqtt_connected=lambda: gateway.mqtt_connected, problems=gateway.problems))
    server = _Server(uvicorn.Config(app, host=settings.api_host, port=settings.api_port,
                                    log_config=None, access_log=False, timeout_graceful_shutdown=2))

    def on_signal(signum: int, frame: object) -> None:
        logger.info("signal %s: stopping", signal.Signals(signum).name)
        server.should_exit = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    gateway.start()
    try:
        server.run()  # returns on SIGTERM/SIGINT
    finally:
        gateway.stop()
        store.close()
        influx.close()
    return gateway.exit_code


def _server_class() -> type:
    import uvicorn  # noqa: PLC0415

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM after its shutdown, which would kill the process before the
        gateway flushed; we own the signals instead (see ``_run``) and exit 0."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server


def _list(limit: int) -> int:
    settings = load_gateway()
    store = DeadLetterStore(settings.dead_letter_db)
    letters = store.list(limit=limit)
    for stored in letters:
        letter = stored.letter
        print(f"{stored.id}\t{letter.received_at.isoformat()}\t{letter.topic}\t{letter.error}\t"
              f"{letter.payload[:120]!r}")
    print(f"{store.count()} dead letter(s)", file=sys.stderr)
    return 0


def _replay(dry_run: bool) -> int:
    """Feed stored dead letters through today's rules (:func:`homeiot.core.ingest.ingest`): those
    valid now are written to InfluxDB and removed; those still invalid, or that InfluxDB refuses,
    stay with their updated reason and are reported — the replay goes on past them. It stops
    (exit 1) only when InfluxDB stores nothing at all (down, refusing our credentials)."""
    settings = load_gateway()
    store = DeadLetterStore(settings.dead_letter_db)
    rules = Rules(settings.mqtt.topic, settings.influx.measurement,
                  timedelta(seconds=settings.max_future_s))
    replayed = kept = refused = 0
    after = 0
    try:
        with InfluxClient(settings.influx) as influx:
            while page := store.list(limit=1000, after_id=after):
                after = page[-1].id
                points: dict[int, str] = {}
                for stored in page:
                    outcome = ingest(rules, stored.letter.topic, stored.letter.payload,
                                     datetime.now(UTC))
                    if isinstance(outcome, Rejection):
                        kept += 1
                        if not dry_run:
                            store.update_error(stored.id, outcome.reason)
                    else:
                        points[stored.id] = outcome.line
                if dry_run or not points:
                    replayed += len(points)
                    continue
                done, refusals = _write_letters(influx, points)
                store.delete(done)
                replayed += len(done)
                for letter_id, reason in refusals.items():
                    refused += 1
                    store.update_error(letter_id, f"InfluxDB refused the point: {reason}")
                    print(f"letter {letter_id}: InfluxDB refused it: {reason}", file=sys.stderr)
    finally:
        store.close()
    verb = "would replay" if dry_run else "replayed"
    logger.info("dead letters: %s=%d still_invalid=%d refused=%d", verb.replace(" ", "_"),
                replayed, kept, refused)
    print(f"{verb} {replayed}, still invalid {kept}, refused by InfluxDB {refused}")
    return 0


def _write_letters(influx: InfluxClient, points: dict[int, str]) -> tuple[list[int], dict[int, str]]:
    """Write the letters' points; returns (stored letter ids, refused letter id → reason).
    Raises when InfluxDB stores nothing at all (the replay cannot go on)."""
    answer = influx.write_answer(list(points.values()))
    decision = writes.policy(answer)
    if decision is writes.Policy.WRITTEN:
        return list(points), {}
    if decision in (writes.Policy.STALL, writes.Policy.RETRY):
        raise InfluxUnavailableError(f"InfluxDB stores nothing ({answer.text}); the letters "
                                     "stay, run the replay again later")
    if decision is writes.Policy.PARTIAL and set(answer.refused) <= set(points.values()):
        refused_lines = set(answer.refused)
        return ([i for i, line in points.items() if line not in refused_lines],
                {i: answer.text for i, line in points.items() if line in refused_lines})
    if len(points) == 1:  # a lone point refused: it stays a letter
        return [], {next(iter(points)): answer.text}
    # Refused without naming the lines, or too large: find them half by half.
    items = list(points.items())
    half = len(items) // 2
    done_a, refused_a = _write_letters(influx, dict(items[:half]))
    done_b, refused_b = _write_letters(influx, dict(items[half:]))
    return done_a + done_b, {**refused_a, **refused_b}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="homeiot-gateway", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("run", help="consume MQTT into InfluxDB and serve the API (default)")
    listing = commands.add_parser("dead-letters", help="list stored dead letters")
    listing.add_argument("--limit", type=int, default=100)
    replay = commands.add_parser("replay-dead-letters",
                                 help="store dead letters that are valid now; keep the rest")
    replay.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        if args.command == "dead-letters":
            return _list(args.limit)
        if args.command == "replay-dead-letters":
            return _replay(args.dry_run)
        return _run()
    except ConfigError as exc:
        logger.error("configuration error: %s", exc)
        return EXIT_CONFIG
    except HomeIotError as exc:
        logger.error("%s: %s", type(exc).__name__, exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
