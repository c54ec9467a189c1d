"""A fake Wi-SUN dongle (ROHM BP35A1 dialect of SKSTACK IP) on a pseudo-terminal, answering
ECHONET Lite Get requests for a low-voltage smart meter (class 0x0288).

momonga talks to it through the pty's slave path exactly as it talks to a USB dongle, so the
``broute`` meter backend is tested with momonga's real code. Only what a B-route session uses is
implemented: ROPT, SKRESET, SKSREG, SKINFO, SKSETRBID, SKSETPWD, SKSCAN (EVENT 20/22 + EPANDESC),
SKLL64, SKJOIN (EVENT 21/25, or 24 for a wrong password), SKSENDTO (EVENT 21 + ERXUDP), SKTERM;
plus session expiry (EVENT 29 → 25) and the faults households report:

* ``silent`` — the dongle stops answering anything (until SKRESET does not help either);
* ``scan_er05`` — the next N ``SKSCAN`` are answered ``FAIL ER05`` (reported for BP35C2);
* :meth:`expire_silently` — the meter ends the PANA session without an event: requests are
  transmitted but never answered until the next successful ``SKJOIN``;
* ``meter_silent`` — the meter stops answering while the dongle lives: requests go out, no answer
  comes back, a scan finds no PAN;
* ``history`` — the meter's half-hour history (0xE2 with the day set by 0xE5), or None for a
  meter without it;
* :meth:`unplug` / :meth:`replug` — the serial device disappears (its symlink ``link`` is removed,
  the pty closed) and comes back as a new pty behind the same path.
"""

from __future__ import annotations

import os
import pty
import select
import threading
import time
import tty
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path

MY_IP6 = "FE80:0000:0000:0000:021D:1290:0003:C890"
METER_MAC = "12345678ABCDEF01"
METER_IP6 = "FE80:0000:0000:0000:1034:5678:ABCD:EF01"
ECHONET_PORT = "0E1A"
NO_VALUE = 0xFFFFFFFE  # a cumulative energy the meter does not have


class FakeDongle:
    def __init__(self, rbid: str, password: str, values: dict[int, bytes],
                 link: Path | None = None, history: dict[date, list[int]] | None = None,
                 today: Callable[[], date] = date.today) -> None:
        self.rbid = rbid
        self.password = password
        self.values = dict(values)
        self.silent = False
        self.meter_silent = False
        self.scan_er05 = 0
        self.session_valid = False
        self.join_attempts = 0
        self.resets = 0
        self.scans = 0
        self.requests: list[list[int]] = []
        self.answered = 0
        self._got_rbid = ""
        self._got_password = ""
        # The meter's memory of half hours (0xE2), by its (JST) day; None: it has none (answers
        # 0xE2 and 0xE5 with "not possible"). ``today`` is the meter's clock.
        self.history = history
        self.history_day = 0
        self.today = today
        self._link = link
        self._lock = threading.Lock()
        self._plug()

    @property
    def path(self) -> str:
        """The device path to give the backend: the symlink when there is one."""
        return str(self._link) if self._link is not None else self._tty

    def _plug(self) -> None:
        self._master, slave = pty.openpty()
        tty.setraw(slave)
        self._tty = os.ttyname(slave)
        self._slave = slave
        if self._link is not None:
            self._link.unlink(missing_ok=True)
            self._link.symlink_to(self._tty)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake-dongle", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._stop.is_set():  # unplugged already
            return
        self._stop.set()
        self._thread.join(5)
        if self._link is not None:
            self._link.unlink(missing_ok=True)
        os.close(self._master)
        os.close(self._slave)

    def unplug(self) -> None:
        """The USB dongle is pulled: the device path vanishes and the open port stops working."""
        self.close()
        self.session_valid = False

    def replug(self) -> None:
        """The dongle is back: a new pty (a new device) behind the same path, freshly reset."""
        self._plug()

    # --- what a test can make happen -------------------------------------------------------------

    def expire_silently(self) -> None:
        """The meter forgets the PANA session and says nothing; the dongle still believes in it."""
        self.session_valid = False

    def expire_session(self) -> None:
        """The PANA session lifetime ends; the dongle re-authenticates on its own."""
        self._send(f"EVENT 29 {METER_IP6}\r\n")
        time.sleep(0.3)
        self._send(f"EVENT 25 {METER_IP6}\r\n")

    # --- the serial line -----------------------------------------------------------------------

    def _send(self, text: str) -> None:
        if self.silent:
            return
        with self._lock:
            os.write(self._master, text.encode())

    def _serve(self) -> None:
        buffer = b""
        while not self._stop.is_set():
            ready, _, _ = select.select([self._master], [], [], 0.1)
            if not ready:
                continue
            try:
                buffer += os.read(self._master, 4096)
            except OSError:
                return
            buffer = self._consume(buffer)

    def _consume(self, buffer: bytes) -> bytes:
        while buffer:
            buffer = buffer.lstrip(b"\r\n")
            if buffer.startswith(b"SKSENDTO"):
                parts = buffer.split(b" ", 6)
                if len(parts) < 7:
                    return buffer
                length = int(parts[5], 16)
                if len(parts[6]) < length:
                    return buffer
                payload, buffer = parts[6][:length], parts[6][length:]
                self._sendto(payload)
                continue
            end = min((i for i in (buffer.find(b"\r\n"), buffer.find(b"\r")) if i >= 0),
                      default=-1)
            if end < 0:
                return buffer
            line, buffer = buffer[:end].decode(), buffer[end:]
            if line:
                self._command(line.split())
        return buffer

    def _command(self, words: list[str]) -> None:  # noqa: PLR0912 - one branch a command
        if self.silent:
            return
        name = words[0]
        if name == "ROPT":
            self._send("OK 01\r")
        elif name == "SKRESET":
            self.resets += 1
            self.session_valid = False
            self._send("OK\r\n")
        elif name == "SKSREG":
            self._send("OK\r\n")
        elif name == "SKINFO":
            self._send(f"EINFO {MY_IP6} 001D12900003C890 21 8888 FFFE\r\nOK\r\n")
        elif name == "SKSETRBID":
            self._got_rbid = words[1]
            self._send("OK\r\n")
        elif name == "SKSETPWD":
            self._got_password = words[2]
            self._send("OK\r\n")
        elif name == "SKSCAN":
            self.scans += 1
            if self.scan_er05 > 0:
                self.scan_er05 -= 1
                self._send("FAIL ER05\r\n")
                return
            self._send("OK\r\n")
            if self.meter_silent:  # no beacon: the scan ends without a PAN description
                self._send(f"EVENT 22 {MY_IP6}\r\n")
                return
            self._send(f"EVENT 20 {MY_IP6}\r\nEPANDESC\r\n  Channel:21\r\n  Channel Page:09\r\n"
                       f"  Pan ID:8888\r\n  Addr:{METER_MAC}\r\n  LQI:E1\r\n  PairID:0003C890\r\n"
                       f"EVENT 22 {MY_IP6}\r\n")
        elif name == "SKLL64":
            self._send(f"{METER_IP6}\r\n")
        elif name == "SKJOIN":
            self.join_attempts += 1
            self._send("OK\r\n")
            if (self._got_rbid, self._got_password) == (self.rbid, self.password) \
                    and not self.meter_silent:
                self.session_valid = True
                self._send(f"EVENT 21 {METER_IP6} 00\r\nEVENT 02 {METER_IP6}\r\n"
                           f"EVENT 25 {METER_IP6}\r\n")
            else:
                self._send(f"EVENT 24 {METER_IP6}\r\n")
        elif name == "SKTERM":
            self.session_valid = False
            self._send(f"OK\r\nEVENT 27 {METER_IP6}\r\n")
        else:
            self._send("FAIL ER04\r\n")

    def _sendto(self, frame: bytes) -> None:
        if self.silent:
            return
        tid, esv, count = frame[2:4], frame[10], frame[11]
        props: list[tuple[int, bytes]] = []
        cur = 12
        for _ in range(count):
            epc, pdc = frame[cur], frame[cur + 1]
            props.append((epc, frame[cur + 2:cur + 2 + pdc]))
            cur += 2 + pdc
        self.requests.append([epc for epc, _ in props])
        if self.meter_silent or not self.session_valid:  # transmitted, never answered
            self._send(f"EVENT 21 {METER_IP6} 00\r\nOK\r\n")
            return
        self.answered += 1
        body = b""
        missing = False
        for epc, data in props:
            if esv == 0x61:  # SetC: only the day of the history (0xE5) can be set
                if epc == 0xE5 and self.history is not None and len(data) == 1:
                    self.history_day = data[0]
                else:
                    missing = True
                body += bytes([epc, 0])
                continue
            edt = self._history_edt() if epc == 0xE2 else self.values.get(epc)
            if edt is None or esv != 0x62:
                missing = True
                body += bytes([epc, 0])
            else:
                body += bytes([epc, len(edt)]) + edt
        answer = {0x61: (0x51, 0x71), 0x62: (0x52, 0x72)}.get(esv, (0x52, 0x72))
        response = (b"\x10\x81" + tid + b"\x02\x88\x01\x05\xff\x01"
                    + bytes([answer[0] if missing else answer[1], count]) + body)
        self._send(f"EVENT 21 {METER_IP6} 00\r\nOK\r\n")
        self._send(f"ERXUDP {METER_IP6} {MY_IP6} {ECHONET_PORT} {ECHONET_PORT} {METER_MAC} 1 "
                   f"{len(response):04X} {response.hex().upper()}\r\n")

    def _history_edt(self) -> bytes | None:
        """0xE2: the day number, then 48 cumulative values (0xFFFFFFFE where there is none)."""
        if self.history is None:
            return None
        day = self.today() - timedelta(days=self.history_day)
        raw = self.history.get(day, [NO_VALUE] * 48)
        return self.history_day.to_bytes(2, "big") + b"".join(v.to_bytes(4, "big") for v in raw)
