"""``make bench-broute``: how long the B-route link takes to notice and heal each fault, with the
production bounds (``LinkTiming()``, ``LinkPolicy()``, momonga's own pacing, a 10 s read interval)
against the fake dongle on a pty.

For each fault: three good readings, the fault, reads every interval until the ladder leaves
re-request (detected), the fault healed at that moment, reads until a reading arrives again
(recovered). Prints one line per fault and run, then a summary with medians, the detection bound
the settings promise (interval + max_misses x request bound) and the ratio against it, and the
process's peak RSS (this process: momonga and the adapter, no MQTT). ``BENCH_RUNS`` (default 1)
runs per fault. Asserts nothing about time.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.fake_dongle import FakeDongle

from homeiot.adapters.broute import BrouteBackend
from homeiot.core.errors import MeterUnavailableError
from homeiot.core.link import LinkPolicy, LinkTiming, Step

INTERVAL_S = 10.0
RBID = "0" * 31 + "1"
PASSWORD = "ABCDEFGHIJKL"  # noqa: S105 - the fake dongle's, not a secret
VALUES = {  # a single-phase meter: 532 W, 3.5 A, 1,234,567.8 kWh in 0.1 kWh units, 8 digits
    0xE7: (532).to_bytes(4, "big", signed=True),
    0xE8: (35).to_bytes(2, "big", signed=True) + (0x7FFE).to_bytes(2, "big"),
    0xE0: (12_345_678).to_bytes(4, "big"), 0xE3: (0).to_bytes(4, "big"),
    0xE1: b"\x01", 0xD3: (1).to_bytes(4, "big"), 0xD7: b"\x08",
}


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def one(name: str, fault: Callable[[FakeDongle], None], heal: Callable[[FakeDongle], None],
        root: Path) -> tuple[float, float]:
    dongle = FakeDongle(RBID, PASSWORD, VALUES, link=root / f"tty-{name}")
    meter = BrouteBackend("meter1", RBID, PASSWORD, dongle.path, timing=LinkTiming(),
                          policy=LinkPolicy())
    try:
        meter.open()
        for _ in range(3):
            meter.read()
        fault(dongle)
        started = time.monotonic()
        detected: float | None = None
        while True:
            try:
                meter.read()
                break
            except MeterUnavailableError:
                if detected is None and meter.link.action.step not in (Step.OK, Step.REREQUEST):
                    detected = time.monotonic() - started
                    heal(dongle)
            time.sleep(INTERVAL_S if detected is None else 1.0)
        recovered = time.monotonic() - started
    finally:
        meter.close()
        dongle.close()
    assert detected is not None
    print(f"broute_fault fault={name} detect_s={detected:.1f} recover_s={recovered:.1f} "
          f"resets={dongle.resets} scans={dongle.scans}", flush=True)
    return detected, recovered


def _set(attr: str, value: bool) -> Callable[[FakeDongle], None]:
    return lambda d: setattr(d, attr, value)


FAULTS: dict[str, tuple[Callable[[FakeDongle], None], Callable[[FakeDongle], None]]] = {
    "dongle_silent": (_set("silent", True), _set("silent", False)),
    "session_expired_silently": (FakeDongle.expire_silently, lambda d: None),
    "meter_silent": (_set("meter_silent", True), _set("meter_silent", False)),
    "device_gone": (FakeDongle.unplug, FakeDongle.replug),
}


def main() -> None:
    runs = int(os.environ.get("BENCH_RUNS", "1"))
    timing, policy = LinkTiming(), LinkPolicy()
    bound = INTERVAL_S + policy.max_misses * timing.request_bound_s
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (fault, heal) in FAULTS.items():
            results = [one(name, fault, heal, Path(tmp)) for _ in range(runs)]
            detect = statistics.median(r[0] for r in results)
            recover = statistics.median(r[1] for r in results)
            summary.append(f"{name}:detect={detect:.1f}s/recover={recover:.1f}s/"
                           f"ratio={detect / bound:.2f}")
    print(f"broute_bench runs={runs} bound_s={bound:.0f} {' '.join(summary)} "
          f"rss_mb={peak_rss_mb():.1f}")


if __name__ == "__main__":
    main()
