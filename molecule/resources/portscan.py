#!/usr/bin/env python3
"""TCP connect scan of every port of one host; prints the open ones, one per line.

    portscan.py HOST [--wait S] [--batch N]

Runs on the scenario's LAN client against the server (our own containers only). A port counts as
open when a TCP handshake completes; filtered (dropped) and refused ports are both closed.

Non-blocking sockets and epoll, a batch at a time: every connect of a batch is issued first, then
the batch gets ``--wait`` seconds *after its last connect* to complete — long enough for the
kernel's first two SYN retransmissions (1 s and 3 s). An earlier asyncio version started each
probe's timeout when the probe was scheduled: on a loaded two-core machine the event loop took
longer than the timeout to get through thousands of tasks, and open ports (SSH) were reported
closed.
"""

from __future__ import annotations

import argparse
import errno
import resource
import selectors
import socket
import time


def _scan_batch(address: str, ports: range, wait: float) -> list[int]:
    selector = selectors.DefaultSelector()
    pending: dict[socket.socket, int] = {}
    pending_sockets: dict[int, socket.socket] = {}
    open_ports: list[int] = []
    try:
        for port in ports:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            code = sock.connect_ex((address, port))
            if code == 0:
                open_ports.append(port)
                sock.close()
            elif code in (errno.EINPROGRESS, errno.EWOULDBLOCK):
                selector.register(sock, selectors.EVENT_WRITE)
                pending[sock] = port
                pending_sockets[sock.fileno()] = sock
            else:  # refused at once
                sock.close()
        deadline = time.monotonic() + wait
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for key, _ in selector.select(remaining):
                sock = pending_sockets[key.fd]
                port = pending.pop(sock)
                selector.unregister(sock)
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    open_ports.append(port)
                sock.close()
    finally:
        for sock in pending:
            sock.close()
        selector.close()
    return open_ports


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("host")
    parser.add_argument("--wait", type=float, default=3.5,
                        help="seconds a batch gets after its last connect (default 3.5: the "
                             "kernel's first two SYN retransmissions, at 1 s and 3 s)")
    # As many sockets at once as the open-file limit allows (at most 16384: four batches).
    soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    parser.add_argument("--batch", type=int, default=max(256, min(16384, soft_limit - 64)))
    args = parser.parse_args()
    address = socket.gethostbyname(args.host)
    found: list[int] = []
    for start in range(1, 65536, args.batch):
        found += _scan_batch(address, range(start, min(start + args.batch, 65536)), args.wait)
    for port in sorted(found):
        print(port)


if __name__ == "__main__":
    main()
