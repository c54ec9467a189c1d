"""``homeiot-archive`` / ``python -m homeiot_batch.run_archive``: archive local days; restore them.

Without arguments, archives every day from the one after the last archived day through yesterday
(Asia/Tokyo by default; on a first run, from the day of the oldest reading in InfluxDB), at most
``--max-days`` of them. Every run also reconciles: the archived days among the last
``--reconcile-days`` (``ARCHIVE_RECONCILE_DAYS``, 7) for which InfluxDB now holds more readings
(late data) are archived again.

``homeiot-archive restore --from D1 [--to D2]`` writes archived days back into InfluxDB.

Exit codes:
  0   done (or nothing to do)
  1   the archive failed (including a verification timeout); the live archive is unchanged
  2   bad configuration or arguments (the message names the variable or option)
  3   InfluxDB is unavailable; retry later
  4   refused to shrink an archived day (``--allow-shrink`` overrides; never to zero rows)
  75  another archive run holds the lock, or another process holds the DuckDB file
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime

from homeiot.config import load_archive
from homeiot.core.days import date_range, plan_days, yesterday
from homeiot.core.errors import ConfigError, HomeIotError, InvalidDataError, TransientError
from homeiot.logs import setup_logging

logger = logging.getLogger("homeiot.archive")

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_SHRINK = 4
EXIT_LOCKED = 75
_EXIT_CODES = ("Exit codes: 0 done, 1 failed (live archive unchanged), 2 bad configuration or "
               "arguments, 3 InfluxDB unavailable, 4 refused to shrink an archived day, 75 another "
               "run or process holds the archive.")


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date like 2025-12-16") from None


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["restore"]:
        return _parse_restore(argv[1:])
    parser = argparse.ArgumentParser(
        prog="run_archive", description="Archive local days from InfluxDB to Parquet and DuckDB. "
        "`homeiot-archive restore --help`: write archived days back into InfluxDB.",
        epilog=_EXIT_CODES)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--date", type=_day, help="archive this one day (YYYY-MM-DD)")
    which.add_argument("--from", dest="first", type=_day, help="first day of a backfill")
    parser.add_argument("--to", dest="last", type=_day,
                        help="last day of a backfill (default: yesterday)")
    parser.add_argument("--max-days", type=int, help="archive at most this many days "
                                                     "(default: ARCHIVE_MAX_DAYS, 31)")
    parser.add_argument("--reconcile-days", type=_non_negative,
                        help="also re-archive the archived days among this many trailing days "
                             "for which InfluxDB holds more readings (default: "
                             "ARCHIVE_RECONCILE_DAYS, 7; 0: off)")
    parser.add_argument("--allow-shrink", action="store_true",
                        help="replace a day even when InfluxDB now holds fewer readings for it "
                             "than the archive (never with zero)")
    args = parser.parse_args(argv)
    args.command = "archive"
    if args.last is not None and args.first is None:
        parser.error("--to needs --from")
    if args.max_days is not None and args.max_days < 1:
        parser.error("--max-days must be at least 1")
    return args


def _parse_restore(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="homeiot-archive restore",
        description="Write archived days (their Parquet partitions) back into InfluxDB with the "
                    "gateway's writer. Idempotent: a point is keyed by source and time.",
        epilog=_EXIT_CODES)
    parser.add_argument("--from", dest="first", type=_day, required=True, help="first day")
    parser.add_argument("--to", dest="last", type=_day, help="last day (default: --from)")
    args = parser.parse_args(argv)
    args.command = "restore"
    return args


def select_days(args: argparse.Namespace, last_archived: date | None, through: date,
                max_days: int, first_day: date | None = None) -> list[date]:
    """The days this run archives, oldest first (before reconciliation). ``first_day`` is where a
    first catch-up starts (the oldest reading's day), when known."""
    if args.date is not None:
        days = [args.date]
    elif args.first is not None:
        days = date_range(args.first, args.last or through)
    else:
        if last_archived is None and first_day is not None and first_day <= through:
            return date_range(first_day, through)[:max_days]
        return plan_days(last_archived=last_archived, through=through, max_days=max_days)
    late = [d for d in days if d > through]
    if late:
        raise InvalidDataError(f"{late[0]} is not over yet in this time zone; the newest day "
                               f"that can be archived is {through}")
    return days[:max_days]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    from homeiot.adapters import duckdb_store  # noqa: PLC0415 - keeps --help fast
    from homeiot.services import archiver  # noqa: PLC0415
    try:
        settings = load_archive()
        through = yesterday(datetime.now(UTC), settings.timezone)
        progress = archiver.terminal_progress if sys.stderr.isatty() else None
        if args.command == "restore":
            days = date_range(args.first, args.last or args.first)
            results = archiver.restore_days(settings, days, progress)
            verb = "restore"
        else:
            last = duckdb_store.last_archived_day(settings.duckdb_path,
                                                  settings.duckdb_memory_limit)
            first = archiver.first_influx_day(settings) if last is None else None
            days = select_days(args, last, through, args.max_days or settings.max_days, first)
            window = (settings.reconcile_days if args.reconcile_days is None
                      else args.reconcile_days)
            late = archiver.days_to_reconcile(settings, through, window, days)
            days = sorted({*days, *late})
            if not days:
                logger.info("archive: nothing to do; archived through %s", last)
                archiver.record_success(settings, 0, 0)
                return 0
            logger.info("archive: days=%d first=%s last=%s reconciled=%d tz=%s", len(days),
                        days[0], days[-1], len(late), settings.timezone.key)
            results = archiver.archive_days(settings, days, progress,
                                            allow_shrink=args.allow_shrink)
            verb = "archive"
            archiver.record_success(settings, len(results), sum(r.rows for r in results))
        if progress is not None:
            sys.stderr.write("\n")
    except (HomeIotError, OSError) as exc:
        for kind, code, what in (
            (ConfigError, EXIT_USAGE, "configuration error"),
            (InvalidDataError, EXIT_USAGE, "bad arguments"),
            (archiver.ArchiveLockedError, EXIT_LOCKED, "locked"),
            (duckdb_store.DatabaseBusyError, EXIT_LOCKED, "busy"),
            (duckdb_store.ShrinkRefusedError, EXIT_SHRINK, "refused"),
            (TransientError, EXIT_UNAVAILABLE, "failed, live archive unchanged"),
        ):
            if isinstance(exc, kind):
                logger.error("%s: %s", what, exc)
                return code
        logger.error("%s failed, live archive unchanged: %s", args.command, exc)
        return EXIT_FAILED
    logger.info("%s: done days=%d rows=%d", verb, len(results), sum(r.rows for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
