#!/usr/bin/env python3
"""TCP connect scan of every port of one host; prints the open ones, one per line.

    portscan.py HOST [--timeout S] [--concurrency N]

Runs on the scenario's LAN client against the server (our own containers only). A port counts as
open when a TCP handshake completes; filtered (dropped) and refused ports are both closed.
"""

from __future__ import annotations

import argparse
import asyncio
import socket


async def _probe(host: str, port: int, timeout: float, gate: asyncio.Semaphore) -> int | None:
    async with gate:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except (OSError, asyncio.TimeoutError):
            return None
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return port


async def _scan(host: str, timeout: float, concurrency: int) -> list[int]:
    gate = asyncio.Semaphore(concurrency)
    results = await asyncio.gather(*(_probe(host, p, timeout, gate) for p in range(1, 65536)))
    return [p for p in results if p is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host")
    parser.add_argument("--timeout", type=float, default=1.5)
    parser.add_argument("--concurrency", type=int, default=8000)
    args = parser.parse_args()
    address = socket.gethostbyname(args.host)
    for port in asyncio.run(_scan(address, args.timeout, args.concurrency)):
        print(port)


if __name__ == "__main__":
    main()
