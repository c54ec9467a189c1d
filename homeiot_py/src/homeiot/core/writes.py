"""What the gateway does with each answer InfluxDB gives to a write: one table, one place.

| answer                                            | policy        | what happens                    |
|---------------------------------------------------|---------------|---------------------------------|
| 2xx                                               | ``WRITTEN``   | acknowledge, send receipts      |
| 400 naming the refused lines (partial write,      | ``PARTIAL``   | the rest is stored: dead-letter |
| unparsable line)                                  |               | the named lines, acknowledge    |
| 400 not naming them (field type conflict), 422,   | ``ISOLATE``   | split the batch until each      |
| other 4xx refusals of the data                    |               | refused point stands alone; a   |
|                                                   |               | lone refused point is a dead    |
|                                                   |               | letter (rewrites are harmless)  |
| 413 (request too large)                           | ``SPLIT``     | write each half on its own; a   |
|                                                   |               | lone line too large: dead letter|
| 401, 403 (credentials), 404 (no such database)    | ``STALL``     | acknowledge nothing, alarm,     |
|                                                   |               | retry slowly: an operator fixes |
|                                                   |               | it and nothing is lost          |
| 429, 5xx, timeout, no connection                  | ``RETRY``     | acknowledge nothing, retry with |
|                                                   |               | capped backoff                  |

A missing database is not a reason to drop data: it is a configuration problem (or an InfluxDB
still being set up), so it stalls like refused credentials.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

RETRY_MIN_S = 0.5
RETRY_MAX_S = 10.0
STALL_RETRY_S = 30.0


class Policy(enum.Enum):
    WRITTEN = "written"
    PARTIAL = "partial"
    ISOLATE = "isolate"
    SPLIT = "split"
    STALL = "stall"
    RETRY = "retry"


@dataclass(frozen=True, slots=True)
class WriteAnswer:
    """InfluxDB's answer to one ``POST /write``: ``status`` is None when none came (timeout, no
    connection); ``refused`` the lines the error text names; ``text`` the error, for reports."""

    status: int | None
    text: str = ""
    refused: tuple[str, ...] = ()


_BY_STATUS = {401: Policy.STALL, 403: Policy.STALL, 404: Policy.STALL, 413: Policy.SPLIT,
              429: Policy.RETRY}


def policy(answer: WriteAnswer) -> Policy:
    """The policy for one answer (see the module's table)."""
    status = answer.status
    if status is None or status >= 500:
        return Policy.RETRY
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    if 200 <= status < 300:
        return Policy.WRITTEN
    if 400 <= status < 500:
        return Policy.PARTIAL if status == 400 and answer.refused else Policy.ISOLATE
    return Policy.RETRY  # 1xx/3xx: nothing InfluxDB should say; drop nothing on it


def backoff(previous_s: float | None) -> float:
    """The next retry delay (before jitter): 0.5 s doubling to 10 s."""
    return RETRY_MIN_S if previous_s is None else min(RETRY_MAX_S, previous_s * 2)
