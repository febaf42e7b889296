"""One node's connection to one NATS broker: outbound only, authenticated by its own key.

The node dials the broker (nats://, tls://, ws:// or wss://; or any of a NATS cluster's
brokers, their URLs comma-separated), signs the broker's nonce with
the NATS user nkey that is its murmur Ed25519 seed (gossip/relay.py, nkey_seed), and then:

* publishes its requests (`RelayLink.publish`): envelopes first as plain messages to a
  recipient that is up, and into JetStream, which keeps them, for one that is not
  (gossip/relay.py, "live first"); probes and receipt requests as plain messages;
* receives what is addressed to it (`serve`): from its JetStream stream, through the durable
  pull consumer `murmur relay` provisioned (fetched in small batches, each message acked
  after it was handled, so what arrived while the node was down is delivered when it comes
  back, and what it was handling when it was killed is delivered again), and live requests
  and answers to its own requests as plain subscriptions.

A broker that is down at start or goes away later is retried for as long as the node runs
(with backoff, each attempt bounded by `connect_timeout_s`); meanwhile publishing reports
failure and the round loop treats the relay's peers as unreachable. Nothing here raises out
of `serve`: a broken broker must not stop a node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
import nats.aio.client
import nats.errors
import nats.js.errors
from murmur.crypto.identity import Identity
from murmur.gossip.relay import (
    CONSUMER,
    inbox_prefix,
    live_subject,
    nkey_of,
    nkey_seed,
    reply_subject,
    sender_of,
    stream_name,
)

if TYPE_CHECKING:
    from murmur.gossip.relay import RelayTransport
    from murmur.node.relay_inbox import RelayInbox

log = logging.getLogger("murmur.relay")

DEFAULT_MAX_PAYLOAD = 1024 * 1024
FETCH_BATCH = 8
FETCH_WAIT_S = 1.0
RETRY_MAX_S = 10.0
PUBLISH_TIMEOUT_S = 10.0
ERROR_LOG_INTERVAL_S = 60.0
# How much nats-py reads from its socket at a time. Its own default, 32 KiB, means a 4 MB
# envelope costs about 130 passes of its pure-Python parser (each also a socket read and a
# buffer append) per hop; at 1 MiB a relayed round at 1M parameters took about 15% less time
# (docs/performance.md, "Relays"). nats-py reads it from this module-level name on every
# read, and has no option for it; tests/test_relay.py checks that the setting holds.
READ_BUFFER_BYTES = 1024 * 1024
nats.aio.client.DEFAULT_BUFFER_SIZE = max(nats.aio.client.DEFAULT_BUFFER_SIZE, READ_BUFFER_BYTES)


class NatsLink:
    """A ``RelayLink`` over nats-py, plus the loop that delivers this node's messages."""

    def __init__(
        self,
        name: str,
        url: str,
        identity: Identity,
        *,
        connect_timeout_s: float = 5.0,
        ca_file: Path | None = None,
    ) -> None:
        self.name = name
        self.url = url
        self.identity = identity
        self.own = nkey_of(identity.public_key)
        self.connect_timeout_s = connect_timeout_s
        self.ca_file = ca_file
        self.nc: Any = None  # nats.aio.client.Client once connected
        self.errors: list[str] = []  # the broker's refusals (permissions), newest last
        self._stopped = asyncio.Event()
        self._logged: dict[str, float] = {}

    async def __aenter__(self) -> NatsLink:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
        if self.nc is not None:
            try:
                async with asyncio.timeout(5):
                    await self.nc.close()
            except (TimeoutError, nats.errors.Error):
                pass
            self.nc = None

    async def _drop_connection(self) -> None:
        """Forget a connection that never came up or was closed (closing it, bounded)."""
        nc, self.nc = self.nc, None
        with contextlib.suppress(TimeoutError, nats.errors.Error):
            async with asyncio.timeout(5):
                await nc.close()

    def stop(self) -> None:
        self._stopped.set()

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def max_payload(self) -> int:
        return int(self.nc.max_payload) if self.nc is not None else DEFAULT_MAX_PAYLOAD

    @property
    def servers(self) -> list[str]:
        """The brokers behind this relay: one URL, or a NATS cluster's, comma-separated
        (nats-py moves to another when one goes away)."""
        return [part.strip() for part in self.url.split(",") if part.strip()]

    def _tls(self) -> ssl.SSLContext | None:
        if not all(u.startswith(("tls://", "wss://")) for u in self.servers):
            return None
        return ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)

    async def connect(self) -> None:
        """One connection attempt (raises on failure); nats-py reconnects by itself after."""

        async def on_error(exc: Exception) -> None:
            text = str(exc)
            self.errors.append(text)
            del self.errors[:-20]
            now = time.monotonic()
            if now - self._logged.get(text, -ERROR_LOG_INTERVAL_S) >= ERROR_LOG_INTERVAL_S:
                self._logged[text] = now  # once a minute per message: a dead broker repeats
                log.warning("relay %s: the broker says: %s", self.name, text)

        async def on_disconnect() -> None:
            if not self._stopped.is_set():
                log.warning("relay %s: disconnected from %s; reconnecting", self.name, self.url)

        async def on_reconnect() -> None:
            log.info("relay %s: reconnected to %s", self.name, self.url)

        self.nc = await nats.connect(
            servers=self.servers,
            nkeys_seed_str=nkey_seed(self.identity).decode(),
            inbox_prefix=inbox_prefix(self.own),
            name=f"murmur {self.identity.name}",
            connect_timeout=self.connect_timeout_s,
            max_reconnect_attempts=-1,
            reconnect_time_wait=1,
            allow_reconnect=True,
            tls=self._tls(),
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
        )
        log.info("relay %s: connected to %s as %s", self.name, self.url, self.own[:12])

    async def publish(
        self,
        subject: str,
        payload: bytes | memoryview,
        headers: dict[str, str],
        *,
        stored: bool,
        reply: str | None = None,
    ) -> bool:
        if not self.connected:
            return False
        try:
            if stored:
                await self.nc.jetstream().publish(
                    subject, payload, headers=headers, timeout=PUBLISH_TIMEOUT_S
                )
            else:
                await self.nc.publish(subject, payload, reply=reply or "", headers=headers)
            return True
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError) as exc:
            log.debug("relay %s: publish failed: %s", self.name, type(exc).__name__)
            return False

    async def _answer(self, sender: str, result: tuple[str, Any] | None) -> None:
        if result is None or not self.connected:
            return
        message_id, answer = result
        from murmur.gossip.relay import answer_headers

        try:
            await self.nc.publish(
                reply_subject(sender, self.own, message_id),
                answer.body,
                headers=answer_headers(answer.status),
            )
        except (nats.errors.Error, OSError):
            log.debug("relay %s: could not answer %s", self.name, sender[:12])

    async def serve(self, inbox: RelayInbox, transport: RelayTransport) -> None:
        """Until ``stop``: stay connected, hand every delivered message to ``inbox`` and
        every answer to ``transport``."""
        delay = 0.5
        while not self._stopped.is_set():
            try:
                if self.nc is None:
                    # nats-py may retry a failing first connection without end (a TLS
                    # handshake that fails, say): bound it, and retry here with backoff.
                    async with asyncio.timeout(2 * self.connect_timeout_s + 5):
                        await self.connect()
                delay = 0.5
                await self._deliver(inbox, transport)
            except (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError) as exc:
                if self._stopped.is_set():
                    break  # closed on purpose
                log.warning(
                    "relay %s: %s (%s); retrying in %.1f s",
                    self.name,
                    "cannot reach the broker" if self.nc is None else "broker trouble",
                    type(exc).__name__,
                    delay,
                )
                if self.nc is not None and (self.nc.is_closed or not self.nc.is_connected):
                    await self._drop_connection()
                try:
                    async with asyncio.timeout(delay):
                        await self._stopped.wait()
                except TimeoutError:
                    pass
                delay = min(delay * 2, RETRY_MAX_S)

    async def _deliver(self, inbox: RelayInbox, transport: RelayTransport) -> None:
        nc = self.nc

        async def on_live(msg: Any) -> None:
            sender = sender_of(msg.subject)
            if sender is not None:
                await self._answer(
                    sender, await inbox.handle(self.name, sender, msg.headers, msg.data)
                )

        async def on_answer(msg: Any) -> None:
            transport.on_answer(msg.subject, msg.headers, msg.data)

        subs = [
            await nc.subscribe(live_subject(self.own, "*"), cb=on_live),
            await nc.subscribe(f"murmur.reply.{self.own}.from.>", cb=on_answer),
        ]
        try:
            pull = await nc.jetstream().pull_subscribe_bind(CONSUMER, stream_name(self.own))
            while not self._stopped.is_set():
                try:
                    messages = await pull.fetch(FETCH_BATCH, timeout=FETCH_WAIT_S)
                except TimeoutError:  # nothing waiting (nats-py raises either kind)
                    continue
                for msg in messages:
                    sender = sender_of(msg.subject)
                    if sender is not None:
                        result = await inbox.handle(self.name, sender, msg.headers, msg.data)
                        await self._answer(sender, result)
                    await msg.ack()
        finally:
            for sub in subs:
                with contextlib.suppress(nats.errors.Error):
                    await sub.unsubscribe()
