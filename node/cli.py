"""The `murmur` command: keygen, node, audit."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="murmur", description="Peer-to-peer federated learning for hospitals."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    keygen = sub.add_parser("keygen", help="create a hospital's Ed25519 identity")
    keygen.add_argument("--name", required=True, help="the hospital's node name, e.g. hospital_a")
    keygen.add_argument(
        "--out", required=True, type=Path, help="directory for NAME.key (0600) and NAME.pub"
    )
    keygen.add_argument("--force", action="store_true", help="overwrite an existing key")

    node = sub.add_parser("node", help="run a hospital node from its config file")
    node.add_argument(
        "--config", required=True, type=Path, help="the node's TOML config (docs/config.md)"
    )
    node.add_argument(
        "--serve", action="store_true", help="keep serving the API after the planned rounds"
    )
    node.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    audit = sub.add_parser("audit", help="verify, export or trace a node's audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser("verify", help="check the hash chain and every signature")
    verify.add_argument("--state", required=True, type=Path, help="the node's state directory")
    verify.add_argument(
        "--public-key", help="the node's public key (hex or .pub file) to check signatures against"
    )
    verify.add_argument(
        "--peer-heads",
        type=Path,
        action="append",
        metavar="FILE",
        help="heads of this node that a peer holds (`murmur audit heads --of THIS_NODE` on the "
        "peer); fails if the log does not contain each of them (it was cut back or replaced). "
        "May be given more than once",
    )
    heads = audit_sub.add_parser(
        "heads", help="export the signed audit heads this node holds of a peer (its receipts)"
    )
    heads.add_argument("--state", required=True, type=Path, help="this node's state directory")
    heads.add_argument("--of", required=True, help="the peer's name (as in this config) or key")
    heads.add_argument("--out", type=Path, help="file to write (default: standard output)")
    heads.add_argument("--limit", type=int, default=100, help="newest receipts to export")
    export = audit_sub.add_parser("export", help="write the log as CSV or JSON")
    export.add_argument("--state", required=True, type=Path)
    export.add_argument("--format", choices=["csv", "json"], default="json")
    export.add_argument("--out", type=Path, help="file to write (default: standard output)")
    lineage = audit_sub.add_parser("lineage", help="which rounds and peers contributed to a model")
    lineage.add_argument("--state", required=True, type=Path)
    lineage.add_argument(
        "--model", required=True, help="the model's SHA-256 (as in /status or report.json)"
    )

    args = parser.parse_args(argv)
    if args.command == "keygen":
        from crypto.identity import keygen_command

        return keygen_command(args.name, args.out, force=args.force)
    if args.command == "node":
        return run_node(args.config, serve=args.serve, log_level=args.log_level)
    return run_audit(args)


def run_node(config_path: Path, *, serve: bool, log_level: str) -> int:
    from node.config import ConfigError, load_config

    logging.basicConfig(
        level=log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
    )
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"murmur: config error: {exc}", file=sys.stderr)
        return 2
    from node.checkpoint import CheckpointError
    from node.durable import StateLock, StateLockError
    from node.node import HospitalNode, StartupError

    try:
        # One process per state directory, for the whole life of this one: taken before the
        # node opens its audit log or writes its first checkpoint.
        with StateLock(config.node.state_dir):
            node = HospitalNode(config)
            return asyncio.run(node.run(serve_forever=serve))
    except (StartupError, StateLockError, CheckpointError, ValueError, OSError) as exc:
        print(f"murmur: cannot start node {config.node.name}: {exc}", file=sys.stderr)
        return 2


def run_audit(args: argparse.Namespace) -> int:
    from node import audit

    if args.audit_command == "verify":
        key = None
        if args.public_key:
            from crypto.identity import load_public_key

            key = load_public_key(args.public_key)
        peer_heads = None
        if args.peer_heads:
            from node.rollback import load_peer_heads

            try:
                peer_heads, warnings = load_peer_heads(args.peer_heads, key, args.state)
            except audit.AuditError as exc:
                print(f"audit verify: {exc}")
                return 2
            for warning in warnings:
                print(f"warning: {warning}")
        return audit.verify_command(args.state, key, peer_heads=peer_heads)
    if args.audit_command == "heads":
        from node.rollback import heads_command

        if args.out:
            with open(args.out, "w") as fh:
                return heads_command(args.state, args.of, fh, limit=args.limit)
        return heads_command(args.state, args.of, sys.stdout, limit=args.limit)
    if args.audit_command == "export":
        if args.out:
            with open(args.out, "w", newline="") as fh:
                return audit.export_command(args.state, args.format, fh)
        return audit.export_command(args.state, args.format, sys.stdout)
    return audit.lineage_command(args.state, args.model, sys.stdout)


if __name__ == "__main__":
    raise SystemExit(main())
