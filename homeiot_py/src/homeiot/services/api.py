"""The gateway's HTTP API (published as app.example.com through the tunnel, so on the internet).

``/healthz`` is open and says nothing; everything under ``/api`` and ``/metrics`` needs a bearer
token from ``API_TOKENS``, compared in constant time. Query parameters are validated and bounded;
the source is matched against the source pattern *and* bound as an InfluxQL parameter, and times
are formatted by us as integers, so no request text reaches a statement. Errors are JSON with a
message — never a stack trace.
"""

from __future__ import annotations

import base64
import hmac
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field, create_model

import homeiot
from homeiot.adapters.deadletters import DeadLetterStore
from homeiot.adapters.influx import InfluxClient
from homeiot.core import table
from homeiot.core.errors import RejectedError, StorageError, TransientError
from homeiot.core.reading import MAX_TS, MIN_TS, SOURCE_PATTERN, epoch_ms

logger = logging.getLogger(__name__)

MAX_RAW_POINTS = 10_000
MAX_BUCKETS = 10_000
MAX_RAW_RANGE = timedelta(days=31)
MAX_RANGE = timedelta(days=366)
MAX_DAYS = 366
LATEST_WINDOW = timedelta(days=30)
_EVERY = re.compile(r"([1-9][0-9]{0,3})(s|m|h|d)")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SOURCE_REGEX = SOURCE_PATTERN.pattern
_READING_FIELDS = tuple(c.influx for c in table.VALUES)
#: /readyz pings InfluxDB at most once per this many seconds, however often it is asked: an
#: unauthenticated endpoint must not let anyone make the server ping InfluxDB at their rate.
READINESS_PING_INTERVAL_S = 5.0


class PingGate:
    """The last InfluxDB ping's outcome, reused for ``interval_s`` (one ping at a time)."""

    def __init__(self, ping: Callable[[], object], interval_s: float = READINESS_PING_INTERVAL_S,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._ping = ping
        self._interval_s = interval_s
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._checked_at: float | None = None
        self._ok = False
        self.pings = 0

    def ok(self) -> bool:
        """Whether InfluxDB answered its ping, at most ``interval_s`` ago. While a ping is under
        way, callers get the previous answer at once instead of queueing behind it (a slow
        InfluxDB must not tie up the API's threads); only before the first answer do they wait."""
        if not self._lock.acquire(blocking=self._checked_at is None):
            return self._ok
        try:
            now = self._monotonic()
            if self._checked_at is None or now - self._checked_at >= self._interval_s:
                self.pings += 1
                try:
                    self._ping()
                    self._ok = True
                except (TransientError, RejectedError):
                    self._ok = False
                self._checked_at = self._monotonic()
            return self._ok
        finally:
            self._lock.release()


@dataclass(frozen=True)
class ApiContext:
    """What the API reads from: InfluxDB, the dead letters, the metrics and the gateway state."""

    influx: InfluxClient
    dead_letters: DeadLetterStore
    registry: CollectorRegistry
    tokens: tuple[str, ...]
    measurement: str
    timezone: ZoneInfo
    source_default: str
    mqtt_connected: Callable[[], bool]
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    #: Why the gateway cannot do its job right now (writer dead or stalled, InfluxDB refusing,
    #: broker unreachable); empty when all is well.
    problems: Callable[[], list[str]] = list
    #: How often /readyz may really ping InfluxDB (see PingGate).
    readiness_ping_interval_s: float = READINESS_PING_INTERVAL_S
    influx_ping: PingGate = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "influx_ping",
                           PingGate(self.influx.ping, self.readiness_ping_interval_s))


class _ReadingKey(BaseModel):
    time: datetime
    source: str


#: A reading: its time and source, then every measured value of the archive's table definition
#: (``homeiot.core.table.VALUES``), each optional.
_READING_VALUES: dict[str, Any] = {
    c.name: (int | None if c.kind == "int" else float | None, None) for c in table.VALUES}
ReadingOut = create_model("ReadingOut", __base__=_ReadingKey, **_READING_VALUES)


class Readings(BaseModel):
    source: str
    start: datetime
    end: datetime
    every: str | None
    truncated: bool
    points: list[dict[str, Any]]


class DailyEnergy(BaseModel):
    date: date
    energy_normal_kwh: float | None
    energy_reverse_kwh: float | None


class DailyEnergyReport(BaseModel):
    source: str
    timezone: str
    days: list[DailyEnergy]


class DayCompleteness(BaseModel):
    date: date
    slots: int = Field(description="half-hour slots stored (fixed-time energy points)")
    slots_expected: int = Field(description="half hours in the local day (48)")
    readings: int = Field(description="readings stored (points with a seq)")
    seq_gaps: int = Field(description="seq numbers missing between the day's first and last")


class CompletenessReport(BaseModel):
    source: str
    timezone: str
    days: list[DayCompleteness]


class DeadLetterOut(BaseModel):
    id: int
    received_at: datetime
    topic: str
    error: str
    payload_base64: str
    payload_preview: str


class DeadLetterPage(BaseModel):
    total: int
    items: list[DeadLetterOut]


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    mqtt: bool
    influxdb: bool
    reasons: list[str] = []


def _bad(message: str) -> HTTPException:
    return HTTPException(status_code=422, detail=message)


def _aware(name: str, value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise _bad(f"{name} must include a time zone, e.g. 2025-12-16T15:00:00Z")
    try:
        value = value.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+00:01 is before year 1 in UTC
        raise _bad(f"{name} must be between 2000 and 2199") from None
    if not MIN_TS <= value < MAX_TS:
        raise _bad(f"{name} must be between 2000 and 2199")
    return value


def _ms_literal(ts: datetime) -> str:
    return f"{epoch_ms(ts)}ms"


def _context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


Ctx = Annotated[ApiContext, Depends(_context)]
_bearer = HTTPBearer(auto_error=False, description="A token from API_TOKENS")


Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _token_ok(ctx: ApiContext, credentials: HTTPAuthorizationCredentials | None) -> bool:
    """Whether the request carries one of the configured bearer tokens."""
    offered = credentials.credentials.encode() if credentials is not None else b""
    # Compare with every token, always, so timing says nothing about which or how much matched.
    matched = False
    for token in ctx.tokens:
        matched |= hmac.compare_digest(offered, token.encode())
    return credentials is not None and matched


def require_token(ctx: Ctx, credentials: Bearer) -> None:
    """401 unless the request carries one of the configured bearer tokens."""
    if not _token_ok(ctx, credentials):
        raise HTTPException(status_code=401, detail="missing or invalid bearer token",
                            headers={"WWW-Authenticate": "Bearer"})


SourceParam = Annotated[str | None, Query(pattern=f"^{_SOURCE_REGEX}$",
                                          description="Meter source (default: SOURCE_DEFAULT)")]
health = APIRouter(tags=["health"])
_REASONS_HIDDEN = "not ready; the reasons are shown with a bearer token from API_TOKENS"
api = APIRouter(prefix="/api/v1", dependencies=[Depends(require_token)])


def _quoted(name: str) -> str:
    """An InfluxQL identifier (config-validated: no '"'); backslashes doubled."""
    return '"' + name.replace("\\", "\\\\") + '"'


def _time_row(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if v is not None and k != "time"}
    out["time"] = datetime.fromtimestamp(row["time"] / 1000, UTC).isoformat()
    return out


@health.get("/healthz", response_model=Health)
def healthz() -> Health:
    """Liveness: the process answers. No details."""
    return Health(status="ok")


@health.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
def readyz(ctx: Ctx, credentials: Bearer) -> JSONResponse:
    """Readiness: connected to the broker, InfluxDB answers and stores, the writer is alive and
    making progress. A 503 says why in ``reasons`` — to a caller with a bearer token only: the
    reasons name sources, topics and hosts, and this endpoint is on the internet through the
    tunnel. InfluxDB's answer may be up to ``READINESS_PING_INTERVAL_S`` old."""
    influx_ok = ctx.influx_ping.ok()
    mqtt_ok = ctx.mqtt_connected()
    reasons = ctx.problems()
    if not influx_ok:
        reasons = ["InfluxDB does not answer its ping", *reasons]
    if reasons and not _token_ok(ctx, credentials):
        reasons = [_REASONS_HIDDEN]
    body = Readiness(ready=influx_ok and mqtt_ok and not reasons, mqtt=mqtt_ok,
                     influxdb=influx_ok, reasons=reasons)
    return JSONResponse(status_code=200 if body.ready else 503, content=body.model_dump())


@health.get("/metrics", dependencies=[Depends(require_token)], response_class=PlainTextResponse)
def metrics(ctx: Ctx) -> PlainTextResponse:
    """Prometheus metrics."""
    return PlainTextResponse(generate_latest(ctx.registry), media_type=CONTENT_TYPE_LATEST)


@api.get("/latest", response_model=ReadingOut, tags=["readings"],
         responses={404: {"description": "No reading in the last 30 days"}})
def latest(ctx: Ctx, source: SourceParam = None) -> _ReadingKey:
    """The newest reading of a source (within the last 30 days)."""
    src = source or ctx.source_default
    since = ctx.clock() - LATEST_WINDOW
    fields = ", ".join(_quoted(f) for f in _READING_FIELDS)
    rows = list(ctx.influx.rows(
        f"SELECT {fields} FROM {_quoted(ctx.measurement)} WHERE \"source\" = $source "  # noqa: S608
        f"AND time >= {_ms_literal(since)} ORDER BY time DESC LIMIT 1",
        params={"source": src}))
    if not rows:
        raise HTTPException(status_code=404,
                            detail=f"no reading for source {src!r} in the last 30 days")
    return ReadingOut.model_validate({**_time_row(rows[0]), "source": src})


@api.get("/readings", response_model=Readings, tags=["readings"])
def readings(
    ctx: Ctx,
    source: SourceParam = None,
    start: Annotated[datetime | None, Query(description="Inclusive, ISO 8601 with zone; "
                                                        "default end - 1 h")] = None,
    end: Annotated[datetime | None, Query(description="Exclusive; default now")] = None,
    every: Annotated[str | None, Query(pattern=r"^[1-9][0-9]{0,3}[smhd]$",
                                       description="Downsample to buckets, e.g. 1m, 15m, 1h")
                     ] = None,
) -> Readings:
    """Readings in a time range, raw (at most 10,000, range ≤ 31 days) or downsampled."""
    src = source or ctx.source_default
    end_utc = _aware("end", end) if end is not None else ctx.clock()
    start_utc = _aware("start", start) if start is not None else end_utc - timedelta(hours=1)
    if start_utc >= end_utc:
        raise _bad("start must be before end")
    span = end_utc - start_utc
    where = (f"FROM {_quoted(ctx.measurement)} WHERE \"source\" = $source AND time >= "
             f"{_ms_literal(start_utc)} AND time < {_ms_literal(end_utc)}")
    if every is None:
        if span > MAX_RAW_RANGE:
            raise _bad("a raw range may span at most 31 days; add every= to downsample")
        fields = ", ".join(_quoted(f) for f in _READING_FIELDS)
        statement = f"SELECT {fields} {where} ORDER BY time ASC LIMIT {MAX_RAW_POINTS + 1}"
    else:
        _check_buckets(every, span)
        statement = (
            'SELECT mean("power_w") AS "power_w", max("power_w") AS "power_max_w", '
            'last("energy_normal_kwh") AS "energy_normal_kwh", '
            f'last("energy_reverse_kwh") AS "energy_reverse_kwh" {where} '
            f"GROUP BY time({every}) fill(none)")
    rows = list(ctx.influx.rows(statement, params={"source": src}))
    return Readings(source=src, start=start_utc, end=end_utc, every=every,
                    truncated=len(rows) > MAX_RAW_POINTS,
                    points=[_time_row(row) for row in rows[:MAX_RAW_POINTS]])


def _check_buckets(every: str, span: timedelta) -> None:
    match = _EVERY.fullmatch(every)
    if match is None:  # the query pattern already guarantees the shape
        raise _bad("every must look like 30s, 15m, 1h or 1d")
    bucket_s = int(match.group(1)) * _UNIT_S[match.group(2)]
    if bucket_s < 10:
        raise _bad("every must be at least 10s")
    if span > MAX_RANGE:
        raise _bad("a range may span at most 366 days")
    if span.total_seconds() / bucket_s > MAX_BUCKETS:
        raise _bad(f"that range at every={every} makes more than {MAX_BUCKETS} buckets")


def _local_days(first: date, last: date) -> Iterator[date]:
    """Every day from ``first`` through ``last``."""
    day = first
    while day <= last:
        yield day
        day += timedelta(days=1)


def _per_local_day(ctx: ApiContext, source: str, select: str, first: date,
                   through: date) -> dict[date, dict[str, Any]]:
    """``select`` (InfluxQL aggregates) of ``source`` per local day, ``first`` through
    ``through``, keyed by that day; days without data are absent."""
    tz = ctx.timezone
    start = datetime.combine(first, datetime.min.time(), tz)
    stop = datetime.combine(through + timedelta(days=1), datetime.min.time(), tz)
    rows = ctx.influx.rows(
        f"SELECT {select} FROM {_quoted(ctx.measurement)} WHERE \"source\" = $source "  # noqa: S608
        f"AND time >= {_ms_literal(start)} AND time < {_ms_literal(stop)} "
        f"GROUP BY time(1d) fill(none) tz('{tz.key}')",
        params={"source": source})
    return {datetime.fromtimestamp(r["time"] / 1000, tz).date(): r for r in rows}


def _day_range(ctx: ApiContext, from_: date | None, to: date | None) -> tuple[date, date]:
    """The local days of a report: ``to`` defaults to today, ``from`` to ``to`` - 6 days."""
    for name, value in (("from", from_), ("to", to)):
        if value is not None and not 2000 <= value.year <= 2198:
            raise _bad(f"{name} must be between 2000-01-01 and 2198-12-31")
    last_day = to or ctx.clock().astimezone(ctx.timezone).date()
    first_day = from_ or last_day - timedelta(days=6)
    if first_day > last_day:
        raise _bad("from must not be after to")
    if (last_day - first_day).days >= MAX_DAYS:
        raise _bad(f"at most {MAX_DAYS} days per request")
    return first_day, last_day


@api.get("/energy/daily", response_model=DailyEnergyReport, tags=["energy"])
def energy_daily(
    ctx: Ctx,
    source: SourceParam = None,
    from_: Annotated[date | None, Query(alias="from",
                                        description="First local day (default to - 6 days)")] = None,
    to: Annotated[date | None, Query(description="Last local day (default today)")] = None,
) -> DailyEnergyReport:
    """kWh bought and sold per local day (HOMEIOT_TIMEZONE, default Asia/Tokyo), from the meter's
    cumulative counters: the first value of the next day minus the first value of this day."""
    src = source or ctx.source_default
    tz = ctx.timezone
    first_day, last_day = _day_range(ctx, from_, to)
    # Through the day after the last: its first value closes the last day.
    by_day = _per_local_day(
        ctx, src, 'first("energy_normal_kwh") AS "fn", last("energy_normal_kwh") AS "ln", '
        'first("energy_reverse_kwh") AS "fr", last("energy_reverse_kwh") AS "lr"',
        first_day, last_day + timedelta(days=1))
    days = []
    for day in _local_days(first_day, last_day):
        row, following = by_day.get(day), by_day.get(day + timedelta(days=1))
        days.append(DailyEnergy(date=day,
                                energy_normal_kwh=_delta(row, following, "fn", "ln"),
                                energy_reverse_kwh=_delta(row, following, "fr", "lr")))
    return DailyEnergyReport(source=src, timezone=tz.key, days=days)


@api.get("/completeness", response_model=CompletenessReport, tags=["readings"])
def completeness(
    ctx: Ctx,
    source: SourceParam = None,
    from_: Annotated[date | None, Query(alias="from",
                                        description="First local day (default to - 6 days)")] = None,
    to: Annotated[date | None, Query(description="Last local day (default today)")] = None,
) -> CompletenessReport:
    """Per local day: how many of the day's half-hour slots are stored (48 when complete), how
    many readings, and how many ``seq`` numbers are missing between the day's first and last —
    what InfluxDB holds, so a gap here is a gap in the data."""
    src = source or ctx.source_default
    tz = ctx.timezone
    first_day, last_day = _day_range(ctx, from_, to)
    by_day = _per_local_day(
        ctx, src, 'count("fixed_energy_normal_kwh") AS "slots", count("seq") AS "n", '
        'min("seq") AS "lo", max("seq") AS "hi"', first_day, last_day)
    days = []
    for day in _local_days(first_day, last_day):
        row = by_day.get(day) or {}
        begin = datetime.combine(day, datetime.min.time(), tz)
        end = datetime.combine(day + timedelta(days=1), datetime.min.time(), tz)
        count = int(row.get("n") or 0)
        gaps = (int(row["hi"]) - int(row["lo"]) + 1 - count) if count else 0
        days.append(DayCompleteness(
            date=day, slots=int(row.get("slots") or 0),
            slots_expected=int((end - begin).total_seconds() // 1800),
            readings=count, seq_gaps=max(gaps, 0)))
    return CompletenessReport(source=src, timezone=tz.key, days=days)


@api.get("/dead-letters", response_model=DeadLetterPage, tags=["dead letters"])
def dead_letters(
    ctx: Ctx,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after_id: Annotated[int, Query(ge=0, le=2**62)] = 0,
) -> DeadLetterPage:
    """Payloads the gateway set aside, oldest first; page on with after_id = the last id seen."""
    items = [
        DeadLetterOut(id=s.id, received_at=s.letter.received_at, topic=s.letter.topic,
                      error=s.letter.error,
                      payload_base64=base64.b64encode(s.letter.payload).decode(),
                      payload_preview=s.letter.payload[:200].decode("utf-8", "replace"))
        for s in ctx.dead_letters.list(limit=limit, after_id=after_id)
    ]
    return DeadLetterPage(total=ctx.dead_letters.count(), items=items)


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("API %s: %s", request.url.path, exc)
    return JSONResponse(status_code=503, content={"detail": "InfluxDB is unavailable; retry later"})


async def _rejected(request: Request, exc: Exception) -> JSONResponse:
    logger.error("API %s: %s", request.url.path, exc)
    return JSONResponse(status_code=502, content={"detail": "InfluxDB refused the query"})


async def _storage(request: Request, exc: Exception) -> JSONResponse:
    logger.error("API %s: %s", request.url.path, exc)
    return JSONResponse(status_code=503,
                        content={"detail": "the dead-letter store is unavailable; see /readyz"})


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("API %s failed", request.url.path, exc_info=exc)
    return JSONResponse(status_code=500, content={"detail": "internal error"})


def create_app(ctx: ApiContext) -> FastAPI:
    """The FastAPI application serving ``ctx``."""
    # No public /docs, /redoc or /openapi.json: the description is served behind the token
    # (the API is on a public hostname through the tunnel).
    app = FastAPI(title="HomeIot gateway API", version=homeiot.__version__,
                  description="Readings, daily energy and dead letters of the HomeIot gateway.",
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_token)])
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    app.include_router(health)
    app.include_router(api)
    app.add_exception_handler(TransientError, _unavailable)
    app.add_exception_handler(RejectedError, _rejected)
    app.add_exception_handler(StorageError, _storage)
    app.add_exception_handler(Exception, _internal)
    return app


def _delta(row: dict[str, Any] | None, following: dict[str, Any] | None, first: str,
           last: str) -> float | None:
    """Energy of one day from cumulative counters; None without data or across a counter reset."""
    if row is None or row.get(first) is None:
        return None
    end = following.get(first) if following is not None else None
    if end is None:
        end = row.get(last)
    if end is None:
        return None
    value = round(float(end) - float(row[first]), 6)
    return value if value >= 0 else None
