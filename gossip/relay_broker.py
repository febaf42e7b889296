"""A NATS broker for a consortium: its configuration from the allowlist, and its streams.

`murmur relay config` writes what `nats-server -c` reads (NATS's configuration format accepts
JSON, so the file is plain JSON from `json.dumps`): one account `MURMUR` with JetStream
limits sized for the consortium, one user per hospital identified by the public nkey of its
murmur key (gossip/relay.py, nkey_of) and allowed exactly `relay_permissions`, and one admin
user (a fresh nkey whose seed is written 0600 beside the config) that `provision` uses to
create each hospital's stream (`IN_<nkey>`, its own `max_bytes`, file storage unless the
plan says memory) and durable consumer. Hospitals cannot create or change streams, so one
cannot raise its own limits or read another's.

Any member can host a broker; several can be joined into one NATS cluster so that no single
host is needed (`ClusterPlan`): each broker gets a unique `server_name`, a route listener and
routes to the others, authenticated by a route secret the relay hosts share (and by TLS when
the broker has a certificate); every hospital's stream is then replicated on up to three of
them (JetStream's RAFT groups), so one broker can die without losing what it held, and a
node lists the cluster's brokers in one relay `url` (comma-separated) to fail over between
them.
"""

from __future__ import annotations

import json
import re
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys
from murmur.gossip.relay import CONSUMER, nkey_of, relay_permissions, stream_name
from nacl.signing import SigningKey

ACCOUNT = "MURMUR"
MB = 1024 * 1024
# NATS's default message size; a larger envelope travels in chunks of this size
# (gossip/relay.py). 8 MiB (NATS's largest recommended) measured no faster: with envelopes
# going live, a chunk costs a header and a copy, not a JetStream acknowledgement.
DEFAULT_MAX_PAYLOAD = 1 * MB
# Where JetStream keeps what waits for an offline hospital. "file" (the default) survives a
# broker restart; "memory" does not: a broker that restarts loses every pending envelope
# (their senders' rounds have long gone on without them; docs/deployment.md, "Storage").
STORAGES = ("file", "memory")


ROUTE_USER = "murmur-route"


class StorageMismatch(ValueError):
    """A stream the broker restored is kept in the other storage than the plan says."""


@dataclass(frozen=True)
class ClusterPlan:
    """This broker's place in a NATS cluster of relay brokers."""

    server_name: str  # unique in the cluster (JetStream's RAFT groups name servers by it)
    listen: str  # HOST:PORT for the other brokers' routes
    routes: tuple[str, ...]  # HOST:PORT of the other brokers' route listeners
    secret: str  # shared by the relay hosts; authenticates routes (never a hospital's key)
    name: str = "murmur"
    replicas: int | None = None  # copies of each hospital's stream; None: up to 3

    @property
    def size(self) -> int:
        return len(self.routes) + 1

    @property
    def stream_replicas(self) -> int:
        return self.replicas if self.replicas is not None else min(3, self.size)

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.server_name):
            raise ValueError(f"cluster server name {self.server_name!r}: use letters, digits, - _")
        if len(self.secret) < 32:
            raise ValueError("the cluster secret is too short: use `murmur relay` to make one")
        if not 1 <= self.stream_replicas <= min(self.size, 5):
            raise ValueError(
                f"replicas {self.stream_replicas}: must be between 1 and the cluster's size "
                f"({self.size}, at most 5)"
            )
        for endpoint in (self.listen, *self.routes):
            host, _, port = endpoint.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{endpoint!r} is not HOST:PORT")


def new_cluster_secret() -> str:
    """A fresh route secret for a cluster (the relay hosts share it, mode 0600)."""
    return secrets.token_urlsafe(32)


@dataclass(frozen=True)
class BrokerPlan:
    """What the broker is for: who may connect and how much it keeps for each."""

    hospitals: dict[str, bytes]  # name -> Ed25519 public key
    listen: str = "127.0.0.1:4222"
    store_dir: Path = Path("relay-store")
    per_hospital_bytes: int = 1024 * MB  # pending envelopes kept for one hospital
    max_age_s: float = 24 * 3600.0  # an envelope older than this is useless anyway
    max_payload: int = DEFAULT_MAX_PAYLOAD  # larger envelopes travel in chunks
    storage: str = "file"  # one of STORAGES: where pending envelopes are kept
    websocket_listen: str | None = None  # e.g. "0.0.0.0:8443", for buildings with HTTPS only
    tls_cert: Path | None = None
    tls_key: Path | None = None
    cluster: ClusterPlan | None = None  # None: a broker on its own

    def validate(self) -> None:
        if not self.hospitals:
            raise ValueError("no hospitals: pass each hospital's .pub file")
        if self.per_hospital_bytes < self.max_payload:
            raise ValueError("per_hospital_bytes must hold at least one message (max_payload)")
        if self.storage not in STORAGES:
            raise ValueError(f"storage {self.storage!r}: use one of {', '.join(STORAGES)}")
        if not 1024 <= self.max_payload <= 64 * MB:
            raise ValueError(f"max_payload {self.max_payload}: NATS takes 1 KiB to 64 MiB")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.cluster is not None:
            self.cluster.validate()

    @property
    def replicas(self) -> int:
        return 1 if self.cluster is None else self.cluster.stream_replicas


def new_admin_seed() -> bytes:
    """A fresh NATS user seed for the broker's admin (only `provision` uses it)."""
    return bytes(nkeys.encode_seed(SigningKey.generate().encode(), nkeys.PREFIX_BYTE_USER))


def admin_public(seed: bytes) -> str:
    return nkeys.from_seed(bytearray(seed)).public_key.decode()


def broker_config(plan: BrokerPlan, admin_seed: bytes) -> dict[str, Any]:
    """The nats-server configuration (a JSON-compatible dict)."""
    plan.validate()
    host, _, port = plan.listen.rpartition(":")
    n = len(plan.hospitals)
    users: list[dict[str, Any]] = [
        {"nkey": nkey_of(key), "permissions": relay_permissions(nkey_of(key))}
        for _, key in sorted(plan.hospitals.items())
    ]
    users.append(
        {
            "nkey": admin_public(admin_seed),
            "permissions": {
                "publish": {"allow": ["$JS.API.>"]},
                "subscribe": {"allow": ["_INBOX.>"]},
            },
        }
    )
    # A server holds at most one copy of each stream; the account's limit counts every copy.
    total = n * plan.per_hospital_bytes
    on_disk = plan.storage == "file"
    config: dict[str, Any] = {
        "host": host or "127.0.0.1",
        "port": int(port),
        "max_payload": plan.max_payload,
        "jetstream": {
            "store_dir": str(plan.store_dir),
            # The streams are on disk, or in memory; the other store holds nothing.
            "max_file_store": total if on_disk else 64 * MB,
            "max_memory_store": 64 * MB if on_disk else total,
        },
        "accounts": {
            ACCOUNT: {
                "jetstream": {
                    "max_file": total * plan.replicas if on_disk else 0,
                    "max_mem": 0 if on_disk else total * plan.replicas,
                    "max_streams": n,
                    "max_consumers": n,
                },
                "users": users,
            }
        },
    }
    if plan.tls_cert is not None:
        config["tls"] = {"cert_file": str(plan.tls_cert), "key_file": str(plan.tls_key)}
    if plan.websocket_listen is not None:
        ws_host, _, ws_port = plan.websocket_listen.rpartition(":")
        websocket: dict[str, Any] = {"host": ws_host, "port": int(ws_port)}
        if plan.tls_cert is not None:
            websocket["tls"] = {"cert_file": str(plan.tls_cert), "key_file": str(plan.tls_key)}
        else:
            websocket["no_tls"] = True
        config["websocket"] = websocket
    if plan.cluster is not None:
        config["server_name"] = plan.cluster.server_name
        config["cluster"] = cluster_block(plan)
    return config


def cluster_block(plan: BrokerPlan) -> dict[str, Any]:
    """nats-server's `cluster` block: the route listener, its authorization, the routes."""
    assert plan.cluster is not None
    c = plan.cluster
    host, _, port = c.listen.rpartition(":")
    block: dict[str, Any] = {
        "name": c.name,
        "host": host,
        "port": int(port),
        "authorization": {"user": ROUTE_USER, "password": c.secret, "timeout": 2},
        "routes": [f"nats-route://{ROUTE_USER}:{c.secret}@{route}" for route in c.routes],
    }
    if plan.tls_cert is not None:
        block["tls"] = {"cert_file": str(plan.tls_cert), "key_file": str(plan.tls_key)}
    return block


def write_broker_config(plan: BrokerPlan, out: Path) -> tuple[Path, Path]:
    """Write OUT (the broker config) and OUT.admin.nk (0600, the admin seed); returns both."""
    from murmur.crypto.identity import _write_file

    seed_path = out.with_name(out.name + ".admin.nk")
    if seed_path.exists():
        seed = seed_path.read_bytes().strip()
    else:
        seed = new_admin_seed()
        _write_file(seed_path, seed.decode() + "\n", 0o600, False)
    out.write_text(json.dumps(broker_config(plan, seed), indent=2) + "\n")
    return out, seed_path


async def provision(url: str, admin_seed: bytes, plan: BrokerPlan, timeout_s: float = 10) -> None:
    """Create (or update) every hospital's stream and durable pull consumer."""
    import nats
    from nats.js.api import (
        AckPolicy,
        ConsumerConfig,
        DeliverPolicy,
        DiscardPolicy,
        StorageType,
        StreamConfig,
    )
    from nats.js.errors import NotFoundError

    async def quiet(exc: Exception) -> None:
        """A failed connection raises below; nats-py's default would also print it."""

    tls = None
    if plan.tls_cert is not None:
        # The broker's own host, just started: its certificate may name only the public
        # host name, so it is not verified here. The admin proves itself by signing the
        # broker's fresh nonce, which nobody on the path can reuse.
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
        url = url.replace("nats://", "tls://", 1)
    nc = await nats.connect(
        url,
        nkeys_seed_str=admin_seed.decode(),
        connect_timeout=timeout_s,
        allow_reconnect=False,
        error_cb=quiet,
        tls=tls,
    )
    try:
        js = nc.jetstream(timeout=timeout_s)
        for _, key in sorted(plan.hospitals.items()):
            own = nkey_of(key)
            config = StreamConfig(
                name=stream_name(own),
                subjects=[f"murmur.to.{own}.>"],
                storage=StorageType.FILE if plan.storage == "file" else StorageType.MEMORY,
                max_bytes=plan.per_hospital_bytes,
                max_age=plan.max_age_s,
                max_msg_size=plan.max_payload,
                discard=DiscardPolicy.OLD,
                num_replicas=plan.replicas,
            )
            try:
                info = await js.stream_info(config.name)
            except NotFoundError:
                await js.add_stream(config)
            else:  # a restarted broker restored it: change it only if the plan did
                current = info.config
                kept = StorageType(current.storage).value
                if kept != plan.storage:
                    raise StorageMismatch(
                        f"stream {config.name} is kept in {kept} storage, the plan says "
                        f"{plan.storage}: JetStream cannot move a stream; keep --storage "
                        f"{kept}, or empty the broker's --store"
                    )
                if (current.max_bytes, current.max_age, current.max_msg_size) != (
                    config.max_bytes,
                    config.max_age,
                    config.max_msg_size,
                ):
                    await js.update_stream(config)
            await js.add_consumer(
                stream_name(own),
                ConsumerConfig(
                    durable_name=CONSUMER,
                    ack_policy=AckPolicy.EXPLICIT,
                    deliver_policy=DeliverPolicy.ALL,
                    ack_wait=60.0,
                    max_ack_pending=256,
                ),
            )
    finally:
        await nc.close()
