"""``homeiot-archive`` / ``python -m homeiot_batch.run_archive``: archive local days.

Without arguments, archives every day from the one after the last archived day through yesterday
(Asia/Tokyo by default; only yesterday on a first run), at most ``--max-days`` of them.

Exit codes:
  0   done (or nothing to do)
  1   the archive failed; the live database is unchanged, the log says why
  2   bad configuration or arguments (the message names the variable or option)
  3   InfluxDB is unavailable; retry later
  75  another archive run holds the lock
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime

from homeiot.adapters.duckdb_store import last_archived_day
from homeiot.config import load_archive
from homeiot.core.days import date_range, plan_days, yesterday
from homeiot.core.errors import ConfigError, HomeIotError, InvalidDataError, TransientError
from homeiot.logs import setup_logging

logger = logging.getLogger("homeiot.archive")

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_LOCKED = 75


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date like 2025-12-16") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="run_archive", description="Archive local days from InfluxDB to Parquet and DuckDB.",
        epilog="Exit codes: 0 done, 1 failed (live database unchanged), 2 bad configuration or "
               "arguments, 3 InfluxDB unavailable, 75 another run holds the lock.")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--date", type=_day, help="archive this one day (YYYY-MM-DD)")
    which.add_argument("--from", dest="first", type=_day, help="first day of a backfill")
    parser.add_argument("--to", dest="last", type=_day,
                        help="last day of a backfill (default: yesterday)")
    parser.add_argument("--max-days", type=int, help="archive at most this many days "
                                                     "(default: ARCHIVE_MAX_DAYS, 31)")
    args = parser.parse_args(argv)
    if args.last is not None and args.first is None:
        parser.error("--to needs --from")
    if args.max_days is not None and args.max_days < 1:
        parser.error("--max-days must be at least 1")
    return args


def select_days(args: argparse.Namespace, last_archived: date | None, through: date,
                max_days: int) -> list[date]:
    """The days this run archives, oldest first."""
    if args.date is not None:
        days = [args.date]
    elif args.first is not None:
        days = date_range(args.first, args.last or through)
    else:
        return plan_days(last_archived=last_archived, through=through, max_days=max_days)
    late = [d for d in days if d > through]
    if late:
        raise InvalidDataError(f"{late[0]} is not over yet in this time zone; the newest day "
                               f"that can be archived is {through}")
    return days[:max_days]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    from homeiot.services.archiver import (  # noqa: PLC0415 - keeps --help fast
        ArchiveLockedError,
        archive_days,
        terminal_progress,
    )
    try:
        settings = load_archive()
        through = yesterday(datetime.now(UTC), settings.timezone)
        last = last_archived_day(settings.duckdb_path, settings.duckdb_memory_limit)
        days = select_days(args, last, through, args.max_days or settings.max_days)
        if not days:
            logger.info("archive: nothing to do; archived through %s", last)
            return 0
        logger.info("archive: days=%d first=%s last=%s tz=%s", len(days), days[0], days[-1],
                    settings.timezone.key)
        progress = terminal_progress if sys.stderr.isatty() else None
        results = archive_days(settings, days, progress)
        if progress is not None:
            sys.stderr.write("\n")
    except (HomeIotError, OSError) as exc:
        for kind, code, what in (
            (ConfigError, EXIT_USAGE, "configuration error"),
            (InvalidDataError, EXIT_USAGE, "bad arguments"),
            (ArchiveLockedError, EXIT_LOCKED, "locked"),
            (TransientError, EXIT_UNAVAILABLE, "archive failed, live database unchanged"),
        ):
            if isinstance(exc, kind):
                logger.error("%s: %s", what, exc)
                return code
        logger.error("archive failed, live database unchanged: %s", exc)
        return EXIT_FAILED
    logger.info("archive: done days=%d rows=%d", len(results), sum(r.rows for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
