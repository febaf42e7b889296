"""Hospitals behind firewalls: what relays and TLS cost, what a broker holds, and whether a
network with faults still learns (issue #17).

1. **Communication, 1M float32 parameters, 8 neighbours.** One sender builds its envelope
   for 8 recipients and sends it with the node's own transports; each receiver authenticates,
   hashes and opens it (verify, decrypt, decode) as a node does, and answers. A round is the
   time until all 8 answers are back. Direct over HTTP (`PeerTransport`, 8 aiohttp servers on
   127.0.0.1), over HTTPS (the same with each server's certificate for its own key, pinned by
   the client), and through one local nats-server (`RelayTransport` / `RelayInbox`, JetStream
   file storage, 1 MB max payload so each envelope travels in chunks). Ratios of best times
   within this run: `relay_over_direct_1m_8` (target <= 1.5) and `https_over_http_1m`
   (target <= 1.2).
2. **Broker memory.** A nats-server configured by `murmur relay` for 100 hospitals holds
   10 MB of pending envelopes for each (1 GB in all, in 1 MB messages): its RSS in GB
   (target <= 1.2).
3. **Faulty run** (needs root for network namespaces; skipped, saying so, otherwise): four
   hospitals on four hosts and a relay on a fifth, one hospital behind a firewall that drops
   inbound and reached only through the relay. Every 3 rounds a random fault: a node
   SIGKILLed and restarted, a node's link cut for a few seconds and restored, or the relay
   killed and restarted. The same network without faults is the baseline: `aborts` (nodes
   that did not finish every planned round with status 0), `auc_gap` (baseline mean AUC
   minus faulty mean AUC, target <= 0.01) and `relay_only_ok` (the firewalled hospital
   finished every round).

Run: `nice -n 10 python bench/faults.py [--quick] [--no-faulty-run] [--repetitions N]`. The
last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from aiohttp import web
from murmur.crypto.allowlist import Allowlist, Peer
from murmur.crypto.identity import Identity, generate_identity
from murmur.gossip.nats_link import NatsLink
from murmur.gossip.relay import RelayTransport
from murmur.gossip.transport import PeerTransport
from murmur.gossip.wire import EnvelopeOpener, ModelUpdate, build_envelope
from murmur.node.relay_inbox import RelayInbox
from murmur.node.tls import private_key_pem, selfsigned

from bench.round import make_state
from tests.relayutil import NATS_SERVER, Broker

K = 8
N_PARAMS = 1_000_000


class Receiver:
    """One neighbour: opens envelopes as a node does (what `RelayInbox` hands to a node, or
    what the HTTP handler reads), and answers `accepted`."""

    def __init__(self, identity: Identity, sender: Identity, spec: Any) -> None:
        self.identity = identity
        self.allowlist = Allowlist([Peer("sender", "", sender.public_key, ("r",))])
        self.opener = EnvelopeOpener(identity, self.allowlist, spec)
        self.limits = SimpleNamespace(
            max_message_bytes=self.opener.max_message_bytes, timestamp_window_s=300.0
        )
        self.opened = 0

    async def receive(self, body: bytes, source: str | None = None, sender: Any = None):
        await asyncio.to_thread(self.opener.open, body)
        self.opened += 1
        return 202, "accepted", ""

    def record_rejection(self, reason: str, detail: str, **_: Any) -> None:
        raise RuntimeError(f"benchmark receiver refused a message: {reason}: {detail}")

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        # The listener hashes every body it reads, a large one in a worker thread.
        await asyncio.to_thread(lambda: hashlib.sha256(body).digest())
        status, reason, _ = await self.receive(body)
        return web.json_response({"reason": reason}, status=status)


class Setup:
    """The sender, its 8 receivers and their peer entries for one way of reaching them."""

    def __init__(self, sender: Identity, receivers: list[Identity], spec: Any) -> None:
        self.sender, self.receivers, self.spec = sender, receivers, spec
        self.runners: list[web.AppRunner] = []

    async def http(self, tmp: Path, tls: bool) -> tuple[PeerTransport, list[Peer]]:
        """8 aiohttp servers (with a certificate for each receiver's key when ``tls``)."""
        peers = []
        for identity in self.receivers:
            receiver = Receiver(identity, self.sender, self.spec)
            app = web.Application(client_max_size=receiver.opener.max_message_bytes)
            app.router.add_post("/gossip", receiver.handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            context = None
            if tls:
                cert, key = tmp / f"{identity.name}.crt", tmp / f"{identity.name}.key"
                cert.write_bytes(selfsigned(identity, ["127.0.0.1"]))
                key.write_bytes(private_key_pem(identity))
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.load_cert_chain(cert, key)
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
            await site.start()
            port = runner.addresses[0][1]
            scheme = "https" if tls else "http"
            peers.append(Peer(identity.name, f"{scheme}://127.0.0.1:{port}", identity.public_key))
            self.runners.append(runner)
        client = None
        if tls:
            client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            client.check_hostname = False
            client.verify_mode = ssl.CERT_NONE  # pinned to each key by PeerTransport
        return PeerTransport(identity=self.sender, send_timeout_s=60, tls=client), peers

    async def close(self) -> None:
        for runner in self.runners:
            await runner.cleanup()


async def _round(transport: Any, sender: Identity, peers: list[Peer], update, r: int) -> float:
    """Seconds until all 8 neighbours answered one freshly built envelope."""
    start = time.perf_counter()
    envelope = build_envelope(update, sender, [p.public_key for p in peers], r)
    results = await transport.send_all(peers, envelope)
    elapsed = time.perf_counter() - start
    failed = [x for x in results if not x.ok]
    if failed:
        raise RuntimeError(f"a send failed: {failed[0]}")
    return elapsed


async def _communication(tmp: Path, repetitions: int) -> dict[str, list[float]]:
    """HTTP, HTTPS and relay rounds interleaved, repetition by repetition (other processes
    can only add time, so the best of each is compared, and the medians too); the warm-up
    repetition is left out."""
    sender = generate_identity("sender")
    receivers = [generate_identity(f"receiver{i}") for i in range(K)]
    update = ModelUpdate(make_state(N_PARAMS), metrics={"loss": 0.5})
    spec = _spec(update)
    setup = Setup(sender, receivers, spec)
    times: dict[str, list[float]] = {"http_s": [], "https_s": [], "relay_s": []}
    broker = Broker(tmp, {i.name: i.public_key for i in [sender, *receivers]}, 256 * 2**20)
    if NATS_SERVER:
        await asyncio.to_thread(broker.start)
    try:
        http, http_peers = await setup.http(tmp, tls=False)
        https, https_peers = await setup.http(tmp, tls=True)
        async with http, https, contextlib.AsyncExitStack() as stack:
            relay, relay_peers = (
                await stack.enter_async_context(_relay(broker, sender, receivers, spec))
                if NATS_SERVER
                else (None, [])
            )
            for r in range(1, repetitions + 2):  # the first repetition warms up
                times["http_s"].append(await _round(http, sender, http_peers, update, 3 * r))
                times["https_s"].append(await _round(https, sender, https_peers, update, 3 * r + 1))
                if relay is not None:
                    times["relay_s"].append(
                        await _round(relay, sender, relay_peers, update, 3 * r + 2)
                    )
    finally:
        await setup.close()
        broker.kill()
    return {name: values[1:] for name, values in times.items()}


@contextlib.asynccontextmanager
async def _relay(broker: Broker, sender: Identity, receivers: list[Identity], spec: Any):
    """The sender's RelayTransport and the receivers' relay peers, every link serving."""
    identities = [sender, *receivers]
    links = [NatsLink("r", broker.url, i) for i in identities]
    transports = [
        RelayTransport("r", i, link, 60) for i, link in zip(identities, links, strict=True)
    ]
    inboxes = [RelayInbox(Receiver(i, sender, spec)) for i in identities]  # type: ignore[arg-type]
    peers = [Peer(i.name, "", i.public_key, ("r",)) for i in receivers]
    async with asyncio.TaskGroup() as group:
        for link, inbox, transport in zip(links, inboxes, transports, strict=True):
            group.create_task(link.serve(inbox, transport))
        try:
            end = time.monotonic() + 20
            while not all(link.connected for link in links):
                if time.monotonic() > end:
                    raise RuntimeError("the benchmark's relay links did not connect")
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # subscriptions and the first fetches are in place
            yield transports[0], peers
        finally:
            for link in links:
                await link.__aexit__()


def _spec(update: ModelUpdate) -> Any:
    return {name: (array.shape, "float32") for name, array in update.tensors.items()}


def communication(repetitions: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory(prefix="murmur-faults-") as tmp:
        return asyncio.run(_communication(Path(tmp), repetitions))


def _ratio(times: dict[str, list[float]], name: str, pick: Any) -> float | None:
    """``pick`` (min, median) of ``name``'s rounds over that of the HTTP rounds."""
    return pick(times[name]) / pick(times["http_s"]) if times[name] else None


# ---------------------------------------------------------------------- broker memory


def broker_rss(hospitals: int, megabytes: int) -> float:
    """GB of RSS of a nats-server holding ``megabytes`` pending for each of ``hospitals``."""
    senders = [generate_identity("sender")]
    recipients = [generate_identity(f"h{i}") for i in range(hospitals)]
    with tempfile.TemporaryDirectory(prefix="murmur-faults-rss-") as tmp:
        broker = Broker(
            Path(tmp),
            {i.name: i.public_key for i in senders + recipients},
            (megabytes + 2) * 2**20,
        )
        broker.start()
        try:
            asyncio.run(_fill(broker, senders[0], recipients, megabytes))
            assert broker.proc is not None
            status = Path(f"/proc/{broker.proc.pid}/status").read_text()
            rss_kb = next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmRSS"))
        finally:
            broker.kill()
    return rss_kb / 2**20


async def _fill(broker: Broker, sender: Identity, recipients: list[Identity], mb: int) -> None:
    from murmur.gossip.relay import nkey_of, stored_subject

    async with NatsLink("r", broker.url, sender) as link:
        await link.connect()
        payload = bytes(2**20 - 4096)
        subjects = [stored_subject(nkey_of(r.public_key), link.own) for r in recipients]
        for chunk in range(mb):
            oks = await asyncio.gather(
                *(
                    link.publish(s, payload, {"Murmur-Chunk": f"{chunk}/{mb}"}, stored=True)
                    for s in subjects
                )
            )
            if not all(oks):
                raise RuntimeError("the broker refused a pending message")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and rounds")
    parser.add_argument("--no-faulty-run", action="store_true", help="skip part 3")
    parser.add_argument("--repetitions", type=int, help="rounds of each kind (default 5)")
    args = parser.parse_args()
    repetitions = args.repetitions or (2 if args.quick else 5)
    times = communication(repetitions)
    comm = {name: min(values) if values else None for name, values in times.items()}
    rss = broker_rss(100, 10) if NATS_SERVER else None
    faulty = None
    if not args.no_faulty_run:
        from bench._faults_on_hosts import faulty_comparison

        faulty = faulty_comparison(rounds=12 if args.quick else 30)
    relay_ratio = _ratio(times, "relay_s", min)
    https_ratio = _ratio(times, "https_s", min)
    relay_median = _ratio(times, "relay_s", statistics.median)
    https_median = _ratio(times, "https_s", statistics.median)
    medians = {name: statistics.median(v) for name, v in times.items() if v}
    rows = [
        (
            "direct HTTP round, 1M params, 8 neighbours (best; median)",
            f"{comm['http_s']:.3f} s; {medians['http_s']:.3f} s",
            "baseline",
        ),
        (
            "direct HTTPS round",
            f"{comm['https_s']:.3f} s; {medians['https_s']:.3f} s",
            f"{https_ratio:.2f}x; median {https_median:.2f}x (<= 1.2)",
        ),
        (
            "round through one relay",
            f"{comm['relay_s']:.3f} s; {medians['relay_s']:.3f} s"
            if comm["relay_s"]
            else "no nats-server",
            f"{relay_ratio:.2f}x; median {relay_median:.2f}x (<= 1.5)" if relay_ratio else "-",
        ),
        (
            "broker RSS, 100 hospitals x 10 MB pending",
            f"{rss:.3f} GB" if rss is not None else "no nats-server",
            "(<= 1.2 GB)",
        ),
    ]
    if faulty is not None and faulty.get("skipped"):
        rows.append(("faulty run", "not run", faulty["skipped"]))
    elif faulty is not None:
        rows += [
            ("faulty run: aborts", str(faulty["aborts"]), "(0)"),
            (
                "faulty run: mean AUC, faulty vs clean",
                f"{faulty['auc_faulty']:.4f} vs {faulty['auc_clean']:.4f}",
                f"gap {faulty['auc_gap']:+.4f} (<= 0.01)",
            ),
            ("faulty run: relay-only hospital finished", str(faulty["relay_only_ok"]), ""),
            ("faulty run: faults injected", ", ".join(faulty["faults"]), ""),
        ]
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>22}  {note}")
    ran = faulty is not None and not faulty.get("skipped")
    result = {
        "aborts": faulty["aborts"] if ran else None,
        "auc_gap": round(faulty["auc_gap"], 4) if ran else None,
        "relay_only_ok": faulty["relay_only_ok"] if ran else None,
        "relay_over_direct_1m_8": round(relay_ratio, 3) if relay_ratio else None,
        "https_over_http_1m": round(https_ratio, 3) if https_ratio else None,
        "relay_rss_gb_100x10mb": round(rss, 3) if rss is not None else None,
        "relay_over_direct_1m_8_median": round(relay_median, 3) if relay_median else None,
        "https_over_http_1m_median": round(https_median, 3) if https_median else None,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
