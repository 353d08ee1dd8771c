"""Argument types the command line's modules share (argparse ``type=`` callables)."""

from __future__ import annotations

import argparse

__all__ = ["tcp_port"]


def tcp_port(value: str) -> int:
    """A TCP port, 0 to 65535 (0: any free port)."""
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port from 0 to 65535, got {value!r}")
    return port
