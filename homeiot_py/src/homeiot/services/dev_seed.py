"""Sample data for development (the seed's ``dev_seed``): simulated readings into InfluxDB."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, time, timedelta

from homeiot.adapters.influx import InfluxClient
from homeiot.config import load_influx, load_source_default, load_timezone
from homeiot.core.days import yesterday
from homeiot.core.errors import ConfigError, HomeIotError, TopicError, TransientError
from homeiot.core.lineprotocol import encode_reading
from homeiot.core.reading import validate_source
from homeiot.core.simulation import SimulatedMeter
from homeiot.logs import setup_logging

logger = logging.getLogger("homeiot.dev_seed")


def _utc(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time like 2025-12-16T15:00:00Z"
                                         ) from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no zone; add Z for UTC")
    return value.astimezone(UTC)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dev_seed", description=__doc__)
    parser.add_argument("--start-utc", type=_utc,
                        help="time of the first reading, UTC (default: the start of yesterday, "
                             "local time)")
    parser.add_argument("--interval-minutes", type=_positive, default=30)
    parser.add_argument("--count", type=_positive, default=48)
    parser.add_argument("--source", help="source tag (default: SOURCE_DEFAULT)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the simulation")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        source = validate_source(args.source) if args.source else load_source_default(
            os.environ)
        settings = load_influx()
        tz = load_timezone(os.environ)
        start = args.start_utc or datetime.combine(yesterday(datetime.now(UTC), tz), time(0), tz)
        meter = SimulatedMeter(source, seed=args.seed, tz=tz)
        step = timedelta(minutes=args.interval_minutes)
        lines = [encode_reading(meter.read(start + i * step), settings.measurement)
                 for i in range(args.count)]
        with InfluxClient(settings) as influx:
            influx.write(lines)
    except TopicError as exc:
        parser.error(str(exc))
    except ConfigError as exc:
        logger.error("configuration error: %s", exc)
        return 2
    except TransientError as exc:
        logger.error("InfluxDB unavailable: %s", exc)
        return 3
    except HomeIotError as exc:
        logger.error("dev_seed failed: %s", exc)
        return 1
    end = start + (args.count - 1) * step
    logger.info("dev_seed: wrote %d readings source=%s from=%s to=%s", args.count, source,
                start.astimezone(UTC).isoformat(), end.astimezone(UTC).isoformat())
    return 0


if __name__ == "__main__":
    sys.exit(main())
