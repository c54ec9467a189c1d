"""The project's fake Wi-SUN dongle (homeiot_py/tests/fake_dongle.py) as a test-only service on
the scenario's Pi, standing in for the USB dongle at DEVICE (a symlink to its pty).

    fake-dongle-service.py CREDENTIALS_FILE DEVICE

CREDENTIALS_FILE holds the B-route ID and password (the scenario's test values), separated by
white space: read from a 0600 file, never from argv. The meter answers a constant 4321 W, so a
reading that came through the B-route path is recognisable at the server. The pty is given to
the dialout group (like a USB serial device) so the publisher's user can open it. Stops on SIGTERM.
"""

from __future__ import annotations

import grp
import os
import signal
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_dongle import FakeDongle  # copied beside this file

POWER_W = 4321
JST = timezone(timedelta(hours=9))


def _fixed_time(cumulative: int) -> bytes:
    now = datetime.now(JST)
    slot = now.replace(minute=now.minute // 30 * 30, second=0, microsecond=0)
    return (slot.year.to_bytes(2, "big") + bytes([slot.month, slot.day, slot.hour, slot.minute, 0])
            + cumulative.to_bytes(4, "big"))


def main() -> int:
    rbid, password = Path(sys.argv[1]).read_text(encoding="ascii").split()[:2]
    device = Path(sys.argv[2])
    values = {
        0xE7: POWER_W.to_bytes(4, "big", signed=True),
        0xE8: (43).to_bytes(2, "big", signed=True) + (0x7FFE).to_bytes(2, "big"),
        0xE0: (12_345_678).to_bytes(4, "big"),
        0xE3: (0).to_bytes(4, "big"),
        0xE1: b"\x01",  # unit 0.1 kWh
        0xD3: (1).to_bytes(4, "big"),
        0xD7: b"\x08",
        0xEA: _fixed_time(12_345_670),
    }
    dongle = FakeDongle(rbid, password, values, link=device)
    tty = os.path.realpath(device)
    os.chown(tty, -1, grp.getgrnam("dialout").gr_gid)
    os.chmod(tty, 0o660)
    print(f"fake dongle on {tty} behind {device}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    dongle.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
