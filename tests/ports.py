"""Ports for servers a test starts: free, and outside the kernel's ephemeral range.

A port taken with ``bind(("127.0.0.1", 0))`` comes from the ephemeral range, which every outgoing connection
on the machine draws its local port from as well: between the probe releasing it and the server binding it
(a Ray head starting, DDP ranks spawning: seconds), any connection may take it, and the server fails with
"address already in use" (or, as Ray's dashboard does, quietly moves to another port). Ports below that range
are only ever taken by a process that asks for one by number.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 20000  # above Ray's worker ports (10002-19999 by default)
_handed_out: set[int] = set()


def ephemeral_range() -> tuple[int, int]:
    """The range the kernel picks outgoing connections' local ports from (Linux; its default elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port() -> int:
    """A port nothing listens on now, below the ephemeral range, not handed out before in this process."""
    low, _ = ephemeral_range()
    top = low if low > LOWEST + 1000 else 65536  # a range starting low leaves no such ports: any will do
    for _ in range(200):
        port = random.randrange(LOWEST, top)
        if port not in _handed_out and is_free(port):
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port for a test server")
