"""The node's HTTP: a peer listener for other nodes, an operator listener for its own people.

**Peer listener** (`[node] listen`): `POST /gossip`, `/receipts`, `/probe`, `/records`,
`/approvals`, `/governance`, `/consensus` and `GET /health`, nothing else. Anyone who can reach
it can talk to it, so everything here is sized for strangers: a Content-Encoding or an oversize
Content-Length is refused before the body is read, and so is every POST whose signed
`Murmur-Auth` header (gossip/auth.py) does not show an admitted peer sending it to this node
just now; with `Expect: 100-continue` all of that happens before the body is even invited. A
stranger's request costs one header check and at most one signature verification, whatever its
size, and is answered `401 unauthenticated`, whatever the precise reason (that stays in this
node's counters and log). An authenticated peer may have only a few bodies in flight and a
bounded number of requests per round; its body must arrive within `body_timeout_s` and hash to
what it signed; a `/gossip` body over 1 MiB is opened as it is read, so a streamed envelope
with a bad header (gossip/wire/stream.py) is refused before a chunk is read. Connections are
capped in all and per source address, idle ones are closed, and
each address may upload only a few bodies at once. Every refusal is a 4xx with a reason code,
counted in /status and /metrics, logged at most once per reason per interval
(node/rejections.py), and answered with the code alone. Nothing computed from training data is
served here; /health says only that the node is up.

**Operator listener** (`[operator] listen`, loopback by default): `GET /status`, `/metrics`,
`/` (the dashboard) and the dashboard's `/alerts` and `/audit/recent` (node/dashboard.py).
They show per-round test metrics with exact counts and the decision threshold chosen on
training rows, which are the hospital's own business. A non-loopback bind needs
`allow_remote` and a bearer token (node/config.py refuses it otherwise).

Both route tables are in `build_peer_app` and `build_operator_app`, one line per route; a
peer route that takes a body is added with `add_peer_route`, which gives it all of the above.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import hdrs, web
from aiohttp.http import HttpProcessingError, HttpVersion11
from murmur.crypto.allowlist import Peer
from murmur.gossip.auth import (
    AUTH_HEADER,
    AuthError,
    PeerAllowance,
    PeerLimiter,
    RequestAuth,
    RequestAuthenticator,
)
from murmur.gossip.consensus_wire import CONSENSUS_PATH
from murmur.gossip.heads import REQUEST_BYTES
from murmur.gossip.peer_records import MAX_RECORDS_BYTES
from murmur.gossip.probe import PROBE_BYTES
from murmur.gossip.wire import STREAM_ABOVE_BYTES
from murmur.node.config import NodeConfig
from murmur.node.consensus_net import consensus_route, route_limit
from murmur.node.governance import GOVERNANCE_PATH, MAX_GOVERNANCE_BYTES, governance_route
from murmur.node.listener import (
    HTTP_STATUS,
    LINGER_BYTES,
    LINGER_S,
    NODE_KEY,
    OPERATOR_LIMITS,
    TOO_LARGE,
    UPLOADS_KEY,
    ConnectionLimits,
    HttpReason,
    Listener,
    new_app,
    plain_errors,
    request_source,
)
from murmur.node.operator_api import build_operator_app, load_operator_token
from murmur.node.records import records_route
from murmur.node.rejections import printable
from murmur.node.rollback import receipts_route
from murmur.node.studies.approvals import MAX_APPROVALS_BODY_BYTES
from murmur.node.tls import peer_listener_tls

if TYPE_CHECKING:
    from murmur.node.served import ServedNode

log = logging.getLogger("murmur.api")

BODY_TIMEOUT_KEY = web.AppKey("body_timeout_s", float)
AUTHENTICATOR_KEY = web.AppKey("authenticator", RequestAuthenticator)
PEER_LIMITER_KEY = web.AppKey("peer_limiter", PeerLimiter)
BODY_LIMITS_KEY = web.AppKey("body_limits", dict)
# Per-request state (aiohttp requests are mutable mappings): the authenticated sender, kept
# from the Expect handler for the route handler, and the peer slot the request holds.
_AUTHENTICATED = web.RequestKey("authenticated", "AuthenticatedRequest")
_PEER_SLOT = web.RequestKey("peer_slot", str)
_REFUSED = web.RequestKey("refused", bool)

# Bodies at most this long are hashed on the event loop; longer ones in a worker thread.
_HASH_INLINE_BYTES = 64 * 1024


@dataclass
class NodeApi:
    """The node's running listeners: no peer listener with `[node] inbound = false`."""

    peer: Listener | None
    operator: Listener

    async def close(self) -> None:
        try:
            if self.peer is not None:
                await self.peer.close()
        finally:
            await self.operator.close()


def operator_token(config: NodeConfig) -> str | None:
    """The operator's bearer token, if the config names a token file (which must be private:
    `load_operator_token`). Called before the node records or binds anything."""
    path = config.operator.token_file
    return load_operator_token(path) if path is not None else None


async def start_api(node: ServedNode, token: str | None) -> NodeApi:
    """Bind the peer listener and the operator listener (which needs `token`, if any)."""
    config = node.config

    def refused(reason: str, detail: str, source: str | None) -> None:
        node.record_rejection(reason, detail, sender=None, round_=None, source=source)

    def refused_operator(reason: str, detail: str, source: str | None) -> None:
        node.rejection_log.warning(
            f"operator:{reason}", "operator listener refused a request (%s): %s", reason, detail
        )

    peer = (
        Listener(
            "peer",
            build_peer_app(node),
            config.node.listen,
            ConnectionLimits.for_peers(config),
            refused,
            ssl=peer_listener_tls(config),
        )
        if config.node.inbound
        else None
    )
    operator = Listener(
        "operator",
        build_operator_app(node, config.operator, token),
        config.operator.listen,
        OPERATOR_LIMITS,
        refused_operator,
    )
    if peer is not None:
        await peer.start()
    try:
        await operator.start()
    except BaseException:
        if peer is not None:
            await peer.close()
        raise
    log.info(
        "peer listener on %s, operator listener on %s",
        peer.address if peer is not None else "none (inbound = false: reached through relays)",
        operator.address,
    )
    return NodeApi(peer=peer, operator=operator)


# ---------------------------------------------------------------------------- peer app


class UploadSlots:
    """Bodies being read right now, per source address (unauthenticated: before any
    signature is checked, an address is all the node knows of a sender)."""

    def __init__(self, per_address: int) -> None:
        self.per_address = per_address
        self.active: Counter[str] = Counter()

    def full(self, source: str) -> bool:
        return self.active[source] >= self.per_address

    @contextlib.contextmanager
    def hold(self, source: str) -> Iterator[None]:
        self.active[source] += 1
        try:
            yield
        finally:
            self.active[source] -= 1
            if self.active[source] <= 0:
                del self.active[source]


def build_peer_app(node: ServedNode) -> web.Application:
    """The peer listener's application; its whole route table is here."""
    listener = node.config.peer_listener
    app = new_app([plain_errors, _peer_request], node.limits.max_message_bytes)
    app[NODE_KEY] = node
    app[BODY_TIMEOUT_KEY] = listener.body_timeout_s
    app[UPLOADS_KEY] = UploadSlots(listener.max_uploads_per_address)
    app[AUTHENTICATOR_KEY] = RequestAuthenticator(
        node.identity.public_key, node.allowlist, node.limits.timestamp_window_s
    )
    app[PEER_LIMITER_KEY] = PeerLimiter(
        PeerAllowance(
            max_bodies=listener.peer_max_bodies,
            burst=listener.peer_burst,
            per_round=listener.peer_requests_per_round,
            per_second=listener.peer_requests_per_s,
        )
    )
    app[BODY_LIMITS_KEY] = {}
    add_peer_route(app, "/gossip", gossip, node.limits.max_message_bytes)
    add_peer_route(app, "/receipts", receipts_route, REQUEST_BYTES)
    add_peer_route(app, "/probe", probe, PROBE_BYTES)
    add_peer_route(app, "/records", records_route, MAX_RECORDS_BYTES)
    add_peer_route(app, "/approvals", approvals_route, MAX_APPROVALS_BODY_BYTES)
    add_peer_route(app, GOVERNANCE_PATH, governance_route, MAX_GOVERNANCE_BYTES)
    add_peer_route(app, CONSENSUS_PATH, consensus_route, route_limit(node))
    app.router.add_get("/health", health)
    return app


def add_peer_route(
    app: web.Application,
    path: str,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    max_body_bytes: int,
) -> None:
    """Add a peer route that takes a body: POST only, authenticated from its headers
    (`Murmur-Auth`, gossip/auth.py) before its body is invited or read, bodies of at most
    `max_body_bytes`. The handler reads the body with `read_peer_body` and learns who sent it
    with `authenticated_peer`."""
    app[BODY_LIMITS_KEY][path] = max_body_bytes
    app.router.add_post(path, handler, expect_handler=expect_peer_body)


@dataclass(frozen=True)
class AuthenticatedRequest:
    """Who sent a peer request (its `Murmur-Auth` verified) and what they signed."""

    peer: Peer
    auth: RequestAuth


def authenticated_peer(request: web.Request) -> Peer:
    """The admitted peer that sent this request; only after `read_peer_body` returned its
    body (before that nobody is authenticated, and this raises KeyError)."""
    return request[_AUTHENTICATED].peer


def _refuse(request: web.Request, reason: str, detail: str, why: str | None = None) -> web.Response:
    """Count and log a refusal; the client gets the reason code and the connection closes
    (after a short linger, so it reads the answer rather than a reset)."""
    request.app[NODE_KEY].record_rejection(
        reason, detail, sender=None, round_=None, source=request_source(request), why=why
    )
    headers = {hdrs.WWW_AUTHENTICATE: AUTH_HEADER} if reason == HttpReason.UNAUTHENTICATED else {}
    response = web.json_response({"reason": reason}, status=HTTP_STATUS[reason], headers=headers)
    response.force_close()
    request[_REFUSED] = True
    return response


def _body_limit(request: web.Request) -> int:
    limits = request.app[BODY_LIMITS_KEY]
    return limits.get(request.path, request.app[NODE_KEY].limits.max_message_bytes)


def _refusal_before_body(request: web.Request) -> web.Response | None:
    """Everything that can be refused from the headers alone, cheapest first: the encoding,
    the declared size, the source address's uploads, the request's authentication, then the
    authenticated peer's concurrency and rate. Decided once per request: the Expect handler's
    verdict is kept for the route handler (the nonce must not count twice)."""
    if _AUTHENTICATED in request:
        return None
    encoding = request.headers.get(hdrs.CONTENT_ENCODING)
    if encoding is not None:
        # Envelopes are encrypted, so compression never helps; and inflating a stranger's
        # bytes is how a small request becomes a large one.
        return _refuse(
            request,
            HttpReason.UNSUPPORTED_ENCODING,
            f"Content-Encoding {printable(encoding, 40)!r}",
        )
    limit = _body_limit(request)
    if request.content_length is not None and request.content_length > limit:
        return _refuse(request, TOO_LARGE, f"Content-Length {request.content_length} > {limit}")
    if request.app[UPLOADS_KEY].full(request_source(request)):
        return _refuse(
            request,
            HttpReason.TOO_MANY_UPLOADS,
            f"{request.app[UPLOADS_KEY].per_address} uploads already in progress",
        )
    try:
        peer, auth = request.app[AUTHENTICATOR_KEY].check(
            request.headers.get(AUTH_HEADER), request.path, request.content_length, time.time()
        )
    except AuthError as exc:
        return _refuse(
            request, HttpReason.UNAUTHENTICATED, f"{exc.why}: {exc.detail}", why=exc.why.value
        )
    limiter = request.app[PEER_LIMITER_KEY]
    if limiter.busy(peer.name):
        return _refuse(
            request,
            HttpReason.TOO_MANY_PEER_UPLOADS,
            f"{peer.name} already has {limiter.allowance.max_bodies} requests in progress",
        )
    node = request.app[NODE_KEY]
    if not limiter.take(peer.name, time.monotonic(), node.current_round):
        return _refuse(
            request, HttpReason.PEER_RATE_LIMITED, f"{peer.name} is over its request allowance"
        )
    request[_AUTHENTICATED] = AuthenticatedRequest(peer, auth)
    _lift_read_cap(request.transport)
    return None


def _lift_read_cap(transport: asyncio.BaseTransport | None) -> None:
    """An authenticated peer's connection reads at asyncio's usual size again
    (`ConnectionLimits.first_read_bytes`)."""
    if transport is not None:
        vars(transport).pop("max_size", None)


async def expect_peer_body(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue`: refuse from the headers before inviting the body; otherwise
    invite it, as aiohttp's default handler does."""
    refusal = _refusal_before_body(request)
    if refusal is not None:
        return refusal
    if request.version != HttpVersion11:
        return None
    expect = request.headers.get(hdrs.EXPECT, "")
    if expect.lower() != "100-continue":
        return _refuse(request, HttpReason.UNSUPPORTED_EXPECT, f"Expect {printable(expect, 40)!r}")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # type: ignore[attr-defined]  # the response has not begun
    return None


@web.middleware
async def _peer_request(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Around every peer route: a POST to a route added with `add_peer_route` is checked and
    authenticated from its headers before its handler runs at all (so a handler cannot
    forget to), a peer's slot (`read_peer_body`) is held until its request has been handled,
    and a refusal sent while the body is still coming is answered at once and the connection
    closed after reading at most `LINGER_BYTES` more."""
    try:
        refusal = None
        if request.method == hdrs.METH_POST and request.path in request.app[BODY_LIMITS_KEY]:
            refusal = _refusal_before_body(request)
        response = refusal if refusal is not None else await handler(request)
    finally:
        peer = request.get(_PEER_SLOT)
        if peer is not None:
            request.app[PEER_LIMITER_KEY].release(peer)
    if request.get(_REFUSED) and not request.content.is_eof():
        await _answer_and_close(request, response)
    return response


async def _answer_and_close(request: web.Request, response: web.StreamResponse) -> None:
    """Send the refusal now; unless the rest of the body is declared longer than
    `LINGER_BYTES`, read and drop up to that much of it (so a client that reads its answer
    only once it has sent everything sees it rather than a reset); then close.

    aiohttp's own lingering would read the whole body, whatever its size, and reading costs
    the event loop about half a millisecond per megabyte: that, not the refusal, was what a
    large unauthenticated POST cost. Lingering over a rest longer than `LINGER_BYTES` would
    not help that client (it is reset anyway), so such a connection is closed at once: the
    kernel drops what is buffered and resets it (bench/wire.py --refusal: a third of what
    refusing a 16 MB stranger cost)."""
    await response.prepare(request)
    await response.write_eof()
    declared = request.content_length  # None when chunked: the rest may be short, so linger
    if declared is not None and declared - request.content.total_bytes > LINGER_BYTES:
        request.protocol.force_close()  # type: ignore[attr-defined]
        return
    left = LINGER_BYTES
    with contextlib.suppress(TimeoutError, ConnectionError, web.RequestPayloadError):
        async with asyncio.timeout(LINGER_S):
            while left > 0 and not request.content.is_eof():
                left -= len(await request.content.readany())
    if not request.content.is_eof():
        request.protocol.force_close()  # type: ignore[attr-defined]


def _claim_body(request: web.Request) -> AuthenticatedRequest | web.Response:
    """Before reading a body: the header checks and authentication, then one of the
    authenticated peer's body slots; the refusal to answer with (already counted) if any."""
    refusal = _refusal_before_body(request)
    if refusal is not None:
        return refusal
    authenticated: AuthenticatedRequest = request[_AUTHENTICATED]
    name = authenticated.peer.name
    if _PEER_SLOT not in request:
        if not request.app[PEER_LIMITER_KEY].acquire(name):
            return _refuse(
                request, HttpReason.TOO_MANY_PEER_UPLOADS, f"{name} has requests in progress"
            )
        request[_PEER_SLOT] = name
    return authenticated


async def read_peer_body(request: web.Request) -> bytes | web.Response:
    """An authenticated peer request's whole body, or the refusal to answer with (already
    counted): the header checks and authentication, one of the source address's upload slots
    and one of the peer's, the body timeout, a typed 4xx for every way reading can fail, and
    the body's SHA-256 against the signed one."""
    authenticated = _claim_body(request)
    if isinstance(authenticated, web.Response):
        return authenticated
    name = authenticated.peer.name
    timeout_s = request.app[BODY_TIMEOUT_KEY]
    with request.app[UPLOADS_KEY].hold(request_source(request)):
        try:
            async with asyncio.timeout(timeout_s):
                body = await request.read()
        except TimeoutError:
            return _refuse(request, HttpReason.BODY_TIMEOUT, f"body not read within {timeout_s}s")
        except ConnectionError:
            return _refuse(request, HttpReason.ABORTED_UPLOAD, "the sender disconnected")
        except (web.RequestPayloadError, HttpProcessingError) as exc:
            return _refuse(request, HttpReason.BAD_BODY, type(exc).__name__)
    if len(body) <= _HASH_INLINE_BYTES:
        digest = hashlib.sha256(body).digest()
    else:  # hashlib releases the GIL on large buffers
        digest = await asyncio.to_thread(lambda: hashlib.sha256(body).digest())
    if digest != authenticated.auth.body_sha256:
        return _refuse(
            request, HttpReason.BODY_MISMATCH, f"the body is not the one {name} signed for"
        )
    return body


class BodyRefused(Exception):
    """A streamed body that did not come as signed: the listener's reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail


class PeerBodyReader:
    """An authenticated peer's body, read in pieces as its consumer asks for them
    (`read(n)`), under the same rules as `read_peer_body`: one deadline for the whole body
    (`body_timeout_s`), a typed refusal (`BodyRefused`) for every way reading can fail, and
    the body's SHA-256 checked against the signed one before its last piece is handed over,
    so a consumer never completes a body the peer did not sign for."""

    def __init__(self, request: web.Request, authenticated: AuthenticatedRequest) -> None:
        self._request = request
        self._authenticated = authenticated
        self._timeout_s = request.app[BODY_TIMEOUT_KEY]
        self._deadline = asyncio.get_running_loop().time() + self._timeout_s
        self._hash = hashlib.sha256()
        self.left = request.content_length or 0

    async def read(self, n: int) -> bytes:
        """Exactly the next ``min(n, left)`` bytes of the body."""
        n = min(n, self.left)
        if n <= 0:
            return b""
        try:
            async with asyncio.timeout_at(self._deadline):
                piece = await self._request.content.readexactly(n)
        except TimeoutError:
            raise BodyRefused(
                HttpReason.BODY_TIMEOUT, f"body not read within {self._timeout_s}s"
            ) from None
        except (ConnectionError, asyncio.IncompleteReadError):
            raise BodyRefused(HttpReason.ABORTED_UPLOAD, "the sender disconnected") from None
        except (web.RequestPayloadError, HttpProcessingError) as exc:
            raise BodyRefused(HttpReason.BAD_BODY, type(exc).__name__) from None
        if len(piece) <= _HASH_INLINE_BYTES:
            self._hash.update(piece)
        else:  # hashlib releases the GIL on large buffers
            await asyncio.to_thread(self._hash.update, piece)
        self.left -= len(piece)
        if self.left == 0 and self._hash.digest() != self._authenticated.auth.body_sha256:
            raise BodyRefused(
                HttpReason.BODY_MISMATCH,
                f"the body is not the one {self._authenticated.peer.name} signed for",
            )
        return piece


async def gossip(request: web.Request) -> web.Response:
    """POST /gossip: one envelope. The answer carries only the reason code.

    A body over `STREAM_ABOVE_BYTES` is opened as it is read (gossip/wire/stream.py): a
    streamed envelope's header is checked before a chunk is read, each chunk as it comes,
    and a refusal is answered at once, the rest of the body left unread."""
    if (request.content_length or 0) > STREAM_ABOVE_BYTES:
        return await _gossip_streamed(request)
    body = await read_peer_body(request)
    if isinstance(body, web.Response):
        return body
    status_code, reason, _detail = await request.app[NODE_KEY].receive(
        body, source=request_source(request), sender=authenticated_peer(request)
    )
    return web.json_response({"reason": reason}, status=status_code)


async def _gossip_streamed(request: web.Request) -> web.Response:
    """`gossip` for a large body: read as the opener asks for it (node/receiver.py
    `receive_stream`); an envelope refused before its end is answered at once and its
    connection closed without reading the rest."""
    authenticated = _claim_body(request)
    if isinstance(authenticated, web.Response):
        return authenticated
    reader = PeerBodyReader(request, authenticated)
    source = request_source(request)
    with request.app[UPLOADS_KEY].hold(source):
        try:
            status_code, reason, _detail = await request.app[NODE_KEY].receive_stream(
                reader.read, request.content_length or 0, source=source, sender=authenticated.peer
            )
        except BodyRefused as refused:
            return _refuse(request, refused.reason, refused.detail)
    if reader.left:
        request[_REFUSED] = True  # refused before the end: answer now, read no more of it
    response = web.json_response({"reason": reason}, status=status_code)
    if reader.left:
        response.force_close()
    return response


async def probe(request: web.Request) -> web.Response:
    """POST /probe: does this node take the asking neighbour's envelopes (gossip/probe.py)?
    The answer carries only the verdict's reason code, as /gossip's does."""
    body = await read_peer_body(request)
    if isinstance(body, web.Response):
        return body
    status_code, reason = request.app[NODE_KEY].answer_probe(
        body, authenticated_peer(request).public_key
    )
    return web.json_response({"reason": reason}, status=status_code)


async def approvals_route(request: web.Request) -> web.Response:
    """`POST /approvals`: a neighbour's signed study approvals (node/studies/gate.py)."""
    body = await read_peer_body(request)
    if isinstance(body, web.Response):
        return body
    node = request.app[NODE_KEY]
    status, reason = node.answer_approvals(body, authenticated_peer(request))
    return web.json_response({"reason": reason}, status=status)


async def health(request: web.Request) -> web.Response:
    """GET /health: the node is up. Nothing else (no name, no round, nothing learnt)."""
    return web.json_response({"ok": True})
