"""Local network helpers shared by the launcher, the process-group rendezvous and the SGLang servers.

Example:
    port = free_port()              # for MASTER_PORT, a launched server, a weight-sync group
"""

from __future__ import annotations

import socket

__all__ = ["free_port"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now (the OS picks it; a race with other processes is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
