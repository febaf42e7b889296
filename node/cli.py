"""The `murmur` command: keygen, key show, config check, node, hosts, tls-selfsigned, relay,
study, consortium, model, audit.

Every failure an operator can cause (a missing file, a bad key, a bad config) ends in one
line saying what is wrong and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return dispatch(args)
    except (OSError, ValueError) as exc:  # IdentityError, ConfigError, AuditError, a bad path
        print(f"murmur: error: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """Every `murmur` command and its options (the audit ones in `_add_audit_commands`)."""
    parser = argparse.ArgumentParser(
        prog="murmur", description="Peer-to-peer federated learning for hospitals."
    )
    from murmur.node import __version__

    parser.add_argument("--version", action="version", version=f"murmur {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    keygen = sub.add_parser("keygen", help="create a hospital's Ed25519 identity")
    keygen.add_argument("--name", required=True, help="the hospital's node name, e.g. hospital_a")
    keygen.add_argument(
        "--out", required=True, type=Path, help="directory for NAME.key (0600) and NAME.pub"
    )
    keygen.add_argument("--force", action="store_true", help="overwrite an existing key")

    key = sub.add_parser("key", help="show a key's public key and fingerprint")
    key_sub = key.add_subparsers(dest="key_command", required=True)
    show = key_sub.add_parser("show", help="print the public key and fingerprint of a key file")
    show.add_argument("path", help="a private key (.key) or public key (.pub) file, or hex")

    config = sub.add_parser("config", help="check config files without starting a node")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser(
        "check",
        help="validate configs and their keys; given several hospitals' configs, also check "
        "that they agree (seed, model, peer keys, degrees, mutual listing)",
    )
    check.add_argument("configs", nargs="+", type=Path, help="one or more node config files")

    node = sub.add_parser("node", help="run a hospital node from its config file")
    node.add_argument(
        "--config", required=True, type=Path, help="the node's TOML config (docs/config.md)"
    )
    node.add_argument(
        "--serve",
        action="store_true",
        help="keep serving the API after the planned rounds (as [node] after_training = serve)",
    )
    node.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="overrides [logging] level (default INFO)",
    )

    hosts = sub.add_parser(
        "hosts",
        help="simulation only: run several hospital nodes in this one process (run_cluster "
        "--hosts-per-process); a hospital runs `murmur node`",
    )
    hosts.add_argument(
        "--config", required=True, type=Path, action="append", help="a node's TOML; repeatable"
    )
    hosts.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    tls = sub.add_parser(
        "tls-selfsigned",
        help="write a TLS certificate for a node's own Ed25519 key (for [tls] and peer_certs)",
    )
    tls.add_argument("--key", required=True, type=Path, help="the node's NAME.key")
    tls.add_argument("--out", required=True, type=Path, help="directory for NAME.crt, NAME.tls.key")
    tls.add_argument(
        "--host",
        action="append",
        default=[],
        help="a DNS name or IP address the node is reached at; repeatable (default localhost)",
    )
    tls.add_argument("--force", action="store_true", help="overwrite existing files")

    from murmur.node.relay_cli import add_relay_parser

    add_relay_parser(sub)
    from murmur.node.consortium_cli import add_consortium_parser

    add_consortium_parser(sub)

    from murmur.node.release import add_model_parser

    add_model_parser(sub)

    from murmur.node.studies.cli import add_study_parser

    add_study_parser(sub)

    _add_audit_commands(sub)
    return parser


def _add_audit_commands(sub: argparse._SubParsersAction) -> None:
    audit = sub.add_parser("audit", help="verify, export, trace or report a node's audit log")
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
    report = audit_sub.add_parser(
        "report",
        help="write a compliance report (HTML, and PDF where Chromium is installed): what left "
        "the hospital, to whom, when, at what privacy cost, and whether the log verifies",
    )
    report.add_argument("--state", required=True, type=Path, help="the node's state directory")
    report.add_argument("--public-key", help="the node's published public key (hex or .pub file)")
    report.add_argument(
        "--peer-heads",
        type=Path,
        action="append",
        metavar="FILE",
        help="as for verify: heads of this node that a peer holds; repeatable",
    )
    report.add_argument(
        "--config",
        type=Path,
        help="the node's config file: names the study, checked against the log's config hash",
    )
    report.add_argument("--out", required=True, type=Path, help="the HTML file to write")
    report.add_argument(
        "--pdf",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also print OUT.pdf with headless Chromium (skipped, saying so, without it)",
    )
    lineage = audit_sub.add_parser("lineage", help="which rounds and peers contributed to a model")
    lineage.add_argument("--state", required=True, type=Path)
    lineage.add_argument(
        "--model", required=True, help="the model's SHA-256 (as in /status or report.json)"
    )


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "keygen":
        from murmur.crypto.identity import keygen_command

        return keygen_command(args.name, args.out, force=args.force)
    if args.command == "key":
        return show_key(args.path)
    if args.command == "config":
        from murmur.node.config_check import config_check_command

        return config_check_command(args.configs, sys.stdout)
    if args.command == "node":
        return run_node(args.config, serve=args.serve, log_level=args.log_level)
    if args.command == "hosts":
        from murmur.node.host import run_hosts

        return run_hosts(args.config, log_level=args.log_level)
    if args.command == "tls-selfsigned":
        from murmur.node.tls import tls_selfsigned_command

        return tls_selfsigned_command(args.key, args.out, args.host, args.force)
    if args.command == "relay":
        from murmur.node.relay_cli import relay_command

        return relay_command(args)
    if args.command == "study":
        from murmur.node.studies.cli import study_command

        return study_command(args)
    if args.command == "model":
        from murmur.node.release import model_command

        return model_command(args, sys.stdout)
    if args.command == "consortium":
        from murmur.node.consortium_cli import consortium_command

        return consortium_command(args)
    return run_audit(args)


def show_key(path: str) -> int:
    """Name, public key and fingerprint: what operators read to each other to admit a peer."""
    from murmur.crypto.identity import fingerprint, load_identity, load_public_key

    if Path(path).suffix == ".key":
        identity = load_identity(path)
        name, public = identity.name, identity.public_key
    else:
        name, public = None, load_public_key(path)
    if name:
        print(f"name:        {name}")
    print(f"public key:  {public.hex()}")
    print(f"fingerprint: {fingerprint(public)}")
    return 0


def run_node(config_path: Path, *, serve: bool, log_level: str | None) -> int:
    from murmur.node.config import ConfigError, load_configs
    from murmur.node.logs import LOG_FORMAT, configure_logging

    try:
        configs = load_configs(config_path)
    except ConfigError as exc:
        logging.basicConfig(level=log_level or "INFO", format=LOG_FORMAT, stream=sys.stderr)
        print(f"murmur: config error: {exc}", file=sys.stderr)
        return 2
    config = configs[0]
    configure_logging(config.logging, log_level)
    from murmur.node.checkpoint import CheckpointError
    from murmur.node.durable import StateLock, StateLockError
    from murmur.node.node import HospitalNode, StartupError

    serve = serve or config.node.after_training == "serve"
    try:
        # One process per state directory, for the whole life of this one: taken before the
        # node opens its audit log or writes its first checkpoint.
        with contextlib.ExitStack() as locks:
            if config.studies_root is not None:
                locks.enter_context(StateLock(config.studies_root))
            for each in configs:
                locks.enter_context(StateLock(each.node.state_dir))
            if config.studies_root is None:
                return asyncio.run(HospitalNode(config).run(serve_forever=serve))
            from murmur.node import multistudy

            host = multistudy.StudyHost(configs)
            return asyncio.run(multistudy.run(host, serve_forever=serve))
    except (StartupError, StateLockError, CheckpointError, ValueError, OSError) as exc:
        # Logged, not printed: a node under a service manager is read from its log file.
        logging.getLogger("murmur.node").error("cannot start node %s: %s", config.node.name, exc)
        return 2


def run_audit(args: argparse.Namespace) -> int:
    from murmur.node import audit

    if args.audit_command in ("verify", "report"):
        key = None
        if args.public_key:
            from murmur.crypto.identity import load_public_key

            key = load_public_key(args.public_key)
        peer_heads, warnings = None, []
        if args.peer_heads:
            from murmur.node.peer_heads import load_peer_heads

            try:
                peer_heads, warnings = load_peer_heads(args.peer_heads, key, args.state)
            except audit.AuditError as exc:
                print(f"audit {args.audit_command}: {exc}")
                return 2
        if args.audit_command == "report":
            from murmur.node.compliance import report_command

            return report_command(
                args.state,
                args.out,
                public_key=key,
                peer_heads=peer_heads,
                peer_head_warnings=warnings,
                config=args.config,
                pdf=args.pdf,
            )
        for warning in warnings:
            print(f"warning: {warning}")
        return audit.verify_command(args.state, key, peer_heads=peer_heads)
    if args.audit_command == "heads":
        from murmur.node.peer_heads import heads_command

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
