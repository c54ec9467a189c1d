"""Benchmark the gateway's per-message core work: decode a payload and encode its point.

Reference measured in the same run: bare ``json.loads`` of the same payloads (the floor for any
JSON consumer). Prints one summary line; asserts nothing about time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from homeiot.core import codec
from homeiot.core.lineprotocol import encode_reading
from homeiot.core.reading import Reading

N = 50_000
ROUNDS = 5


def best_rate(work: Callable[[], None], count: int) -> float:
    """Messages per second of the fastest of ROUNDS runs (the least disturbed by noise)."""
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return count / best


def main() -> None:
    t0 = datetime(2025, 12, 16, 15, tzinfo=UTC)
    payloads = [
        codec.encode(Reading("meter1", t0 + timedelta(seconds=i), i, 300.0 + i % 500,
                             current_r_a=3.2, current_t_a=1.1, energy_normal_kwh=12345.6 + i / 1000,
                             energy_reverse_kwh=0.0))
        for i in range(N)
    ]

    def reference() -> None:
        for payload in payloads:
            json.loads(payload)

    def core() -> None:
        for payload in payloads:
            encode_reading(codec.decode(payload, "meter1"))

    json_rate = best_rate(reference, N)
    core_rate = best_rate(core, N)
    print(f"core_bench msgs={N} core_rate={core_rate:.0f} json_rate={json_rate:.0f} "
          f"ratio={core_rate / json_rate:.3f}")


if __name__ == "__main__":
    main()
