"""Receipts: the gateway's end-to-end acknowledgement of what InfluxDB stored, per source.

After InfluxDB accepted a batch, the gateway publishes to ``{MQTT_RECEIPT_TOPIC}/{source}`` (by
default ``homeiot/receipts/meter1``, a tree apart from the readings' ``{MQTT_TOPIC}/+``) exactly
which of that source's readings are stored, by ``seq``, as inclusive ranges::

    {"v": 1, "stored": [[0, 41], [45, 45]], "dead": [[42, 42]]}

``dead`` (absent when empty) names the readings the gateway could not store but set aside in its
dead-letter store, durably, before it said so (InfluxDB refused them for good, or they broke
today's rules): ``homeiot-gateway replay-dead-letters`` stores them once the cause is fixed, so
the publisher may delete them too instead of resending them for ever.

Backlog and live readings interleave, so a receipt lists seqs, never a high-water mark. The
publisher deletes a reading from its outbox only when a receipt for its own source names it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from homeiot.core.errors import PayloadError, TopicError
from homeiot.core.reading import MAX_SEQ, validate_source
from homeiot.core.topics import validate_base_topic

VERSION = 1
DEFAULT_RECEIPT_TOPIC = "homeiot/receipts"

Ranges = tuple[tuple[int, int], ...]


def receipt_topic(root: str, source: str) -> str:
    """Where the receipts of ``source`` go."""
    return f"{validate_base_topic(root)}/{validate_source(source)}"


def source_of(root: str, topic: str) -> str:
    """The source a receipt on ``topic`` is for; raises :class:`TopicError`."""
    prefix = root + "/"
    if not topic.startswith(prefix):
        raise TopicError(f"receipt topic {topic!r} is not under {root!r}")
    return validate_source(topic[len(prefix):])


def validate_receipt_root(root: str, readings_base: str) -> str:
    """The receipt root must not overlap the readings' tree: the gateway reads ``{base}/#``."""
    validate_base_topic(root)
    if root == readings_base or root.startswith(readings_base + "/") or \
            readings_base.startswith(root + "/"):
        raise TopicError(f"receipt topic {root!r} must lie outside the readings' topic "
                         f"{readings_base!r} (and not contain it)")
    return root


def to_ranges(seqs: Iterable[int]) -> Ranges:
    """Sorted, merged inclusive ranges of ``seqs``: ``[3, 1, 2, 7]`` → ``((1, 3), (7, 7))``."""
    ranges: list[tuple[int, int]] = []
    for seq in sorted(set(seqs)):
        if ranges and seq == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], seq)
        else:
            ranges.append((seq, seq))
    return tuple(ranges)


def contains(ranges: Ranges, seq: int) -> bool:
    return any(low <= seq <= high for low, high in ranges)


@dataclass(frozen=True, slots=True)
class Body:
    """What a receipt says: these seqs are stored in InfluxDB, those are dead letters."""

    stored: Ranges
    dead: Ranges = ()


def encode(stored: Ranges, dead: Ranges = ()) -> bytes:
    body: dict[str, object] = {"v": VERSION, "stored": [list(r) for r in stored]}
    if dead:
        body["dead"] = [list(r) for r in dead]
    return json.dumps(body, separators=(",", ":")).encode()


def decode(payload: bytes) -> Body:
    """What a receipt says; raises :class:`PayloadError` for anything else. A receipt without
    ``dead`` (from a gateway before it existed) names no dead letters."""
    try:
        body = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"receipt is not JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("v") != VERSION or \
            not isinstance(body.get("stored"), list) or \
            not isinstance(body.get("dead", []), list):
        raise PayloadError('receipt must be {"v": 1, "stored": [[low, high], ...], '
                           '"dead": [[low, high], ...]}')
    return Body(_ranges(body["stored"]), _ranges(body.get("dead", [])))


def _ranges(items: list[object]) -> Ranges:
    ranges = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) for n in item)
                and 0 <= item[0] <= item[1] <= MAX_SEQ):
            raise PayloadError(f"receipt range {item!r} is not [low, high] with 0 <= low <= high")
        ranges.append((item[0], item[1]))
    return tuple(ranges)
