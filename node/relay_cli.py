"""`murmur relay config` and `murmur relay run` (filled in with gossip/relay.py)."""

from __future__ import annotations

import argparse


def add_relay_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sub.add_parser("relay", help="NATS relay broker configuration (see docs/deployment.md)")


def relay_command(args: argparse.Namespace) -> int:
    raise SystemExit("murmur relay: not built yet")
