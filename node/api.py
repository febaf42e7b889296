"""The node's HTTP: a peer listener for other nodes, an operator listener for its own people.

**Peer listener** (`[node] listen`): `POST /gossip`, `POST /receipts` and `GET /health`,
nothing else. Anyone who can reach it can talk to it, so everything here is sized for
strangers: a Content-Encoding or an oversize Content-Length is refused before the body is
read, and so is every POST whose signed `Murmur-Auth` header (gossip/auth.py) does not show
an admitted peer sending it to this node just now; with `Expect: 100-continue` all of that
happens before the body is even invited. A stranger's request costs one header check and at
most one signature verification, whatever its size, and is answered `401 unauthenticated`,
whatever the precise reason (that stays in this node's counters and log). An authenticated
peer may have only a few bodies in flight and a bounded number of requests per round; its
body must arrive within `body_timeout_s` and hash to what it signed. Connections are capped
in all and per source address, idle ones are closed, and each address may upload only a few
bodies at once. Every refusal is a 4xx with a reason code, counted in /status and /metrics,
logged at most once per reason per interval (node/rejections.py), and answered with the code
alone. Nothing computed from training data is served here; /health says only that the node
is up.

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
import hmac
import json
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from ssl import SSLContext
from typing import TYPE_CHECKING, Any

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
from murmur.gossip.heads import REQUEST_BYTES
from murmur.gossip.peer_records import MAX_RECORDS_BYTES
from murmur.gossip.probe import PROBE_BYTES
from murmur.node.config import NodeConfig, OperatorSection, is_loopback, split_listen
from murmur.node.dashboard import alerts, audit_recent, dashboard
from murmur.node.records import records_route
from murmur.node.rejections import RateLimitedLog, printable
from murmur.node.rollback import receipts_route
from murmur.node.tls import peer_listener_tls

if TYPE_CHECKING:
    from murmur.node.served import ServedNode

log = logging.getLogger("murmur.api")

NODE_KEY = web.AppKey("node", "ServedNode")
UPLOADS_KEY = web.AppKey("uploads", "UploadSlots")
BODY_TIMEOUT_KEY = web.AppKey("body_timeout_s", float)
AUTH_KEY = web.AppKey("auth", "OperatorAuth")
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


class HttpReason(StrEnum):
    """Reason codes of the HTTP layer, besides the envelope's (gossip/wire.py RejectReason,
    of which this layer also uses `too_large`). docs/protocol.md, "HTTP"."""

    UNSUPPORTED_ENCODING = "unsupported_encoding"
    UNSUPPORTED_EXPECT = "unsupported_expect"
    BODY_TIMEOUT = "body_timeout"
    BAD_BODY = "bad_body"
    ABORTED_UPLOAD = "aborted_upload"
    TOO_MANY_UPLOADS = "too_many_uploads"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    BAD_HTTP = "bad_http"
    UNAUTHENTICATED = "unauthenticated"
    BODY_MISMATCH = "body_mismatch"
    TOO_MANY_PEER_UPLOADS = "too_many_peer_uploads"
    PEER_RATE_LIMITED = "peer_rate_limited"


TOO_LARGE = "too_large"  # the envelope's own code (RejectReason.TOO_LARGE), answered 413

HTTP_STATUS: dict[str, int] = {
    HttpReason.UNSUPPORTED_ENCODING: 415,
    HttpReason.UNSUPPORTED_EXPECT: 417,
    HttpReason.BODY_TIMEOUT: 408,
    HttpReason.BAD_BODY: 400,
    HttpReason.ABORTED_UPLOAD: 400,  # never seen by the sender: it has gone
    HttpReason.TOO_MANY_UPLOADS: 429,
    HttpReason.TOO_MANY_CONNECTIONS: 503,
    HttpReason.BAD_HTTP: 400,
    HttpReason.UNAUTHENTICATED: 401,
    HttpReason.BODY_MISMATCH: 400,
    HttpReason.TOO_MANY_PEER_UPLOADS: 429,
    HttpReason.PEER_RATE_LIMITED: 429,
    TOO_LARGE: 413,
}

# After refusing a request whose body is still coming, read and discard at most this much of
# it, for at most this long, so the client sees the refusal rather than a connection reset,
# then close the connection; a rest declared longer (Content-Length) is not read at all (the
# connection is closed at once): a stranger's 16 MB upload is never read.
LINGER_S = 2.0
LINGER_BYTES = 256 * 1024
# How long closing a listener waits for requests in flight (bodies are bounded by the body
# timeout; a node that is stopping should not wait for strangers).
SHUTDOWN_TIMEOUT_S = 2.0
OPERATOR_MAX_BODY = 1024  # the operator routes are all GETs
FIRST_READ_BYTES = 16 * 1024  # ConnectionLimits.first_read_bytes of the peer listener
MAX_TOKEN_FILE_BYTES = 4096
MIN_TOKEN_CHARS = 32


@dataclass(frozen=True)
class ConnectionLimits:
    """How many connections one listener keeps, and for how long an idle one.

    `first_read_bytes`: the most one read takes from a connection until a request on it has
    been authenticated (`_refusal_before_body` lifts it), instead of asyncio's 256 KiB. A
    request's headers fit in one such read; a stranger's body does not get read with them.
    Every byte read opens the TCP window for more of the stranger's body, which the kernel
    then receives, all for nothing: with 16 KiB first reads a refused 16 MB POST costs about
    a third less (bench/wire.py --refusal, bench/hostile.py)."""

    idle_timeout_s: float
    max_connections: int
    max_connections_per_address: int
    backlog: int = 128
    first_read_bytes: int | None = None

    @classmethod
    def for_peers(cls, config: NodeConfig) -> ConnectionLimits:
        """`[peer_listener]` in docs/config.md."""
        s = config.peer_listener
        return cls(
            s.idle_timeout_s,
            s.max_connections,
            s.max_connections_per_address,
            first_read_bytes=FIRST_READ_BYTES,
        )


# The operator listener serves a few local clients (a browser, a scraper, run_cluster).
OPERATOR_LIMITS = ConnectionLimits(
    idle_timeout_s=15.0, max_connections=32, max_connections_per_address=32, backlog=32
)


# ---------------------------------------------------------------------------- listeners


class _ServerLog(logging.LoggerAdapter):
    """The logger aiohttp's connection handler reports errors to.

    aiohttp logs a malformed request (bad request line, header, chunk framing) as an ERROR
    with a traceback whose message quotes the sender's bytes. Here such a request is counted
    as `bad_http` and logged as one rate-limited line naming only the error's type; a client
    that disconnected is not an error at all. Anything else is a bug in this node: it keeps
    its traceback (rate-limited too, since a stranger might be able to trigger it).
    """

    def __init__(self, listener: str, on_refused: Callable[[str, str, str | None], None]):
        super().__init__(log, {})
        self._listener = listener
        self._on_refused = on_refused
        self._limited = RateLimitedLog(log)

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        remote = args[0] if args and isinstance(args[0], str) else None
        if isinstance(exc, HttpProcessingError):
            self._on_refused(HttpReason.BAD_HTTP, type(exc).__name__, remote)
        elif isinstance(exc, ConnectionError):
            log.debug("%s listener: a client disconnected (%s)", self._listener, type(exc).__name__)
        elif isinstance(exc, BaseException):
            self._limited.log(
                logging.ERROR,
                type(exc).__name__,
                "%s listener: error handling a request from %s",
                self._listener,
                remote,
                exc_info=exc,
            )
        elif self.isEnabledFor(level):
            super().log(level, msg, *args, **kwargs)


class _RequestHandler(web.RequestHandler):
    """aiohttp's connection handler with one change: a request that does not parse is
    answered like every other refusal, `400 {"reason": "bad_http"}` with `Server: murmur`.
    aiohttp's own answer is text that quotes the sender's bytes back and names aiohttp's and
    Python's versions. aiohttp still logs the error first (so `_ServerLog` counts it)."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        response = super().handle_error(request, status, exc, message)
        if isinstance(exc, HttpProcessingError):
            response = web.json_response({"reason": HttpReason.BAD_HTTP.value}, status=status)
            response.force_close()
        response.headers[hdrs.SERVER] = "murmur"
        return response


_BUSY_BODY = json.dumps({"reason": HttpReason.TOO_MANY_CONNECTIONS.value}).encode()
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


class _Admission(asyncio.Protocol):
    """The first protocol of every accepted connection: it asks the listener whether the
    connection may have an HTTP handler and, if so, hands the transport over to one, before
    a single byte is read. Refused connections get a 503 and are closed."""

    def __init__(self, listener: Listener) -> None:
        self._listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        handler = self._listener.admit(transport)
        if handler is not None:
            transport.set_protocol(handler)
            handler.connection_made(transport)


class Listener:
    """One bound HTTP listener: an aiohttp application behind a connection cap.

    aiohttp has no connection cap of its own, so the listening socket is created here
    (asyncio's create_server) with `_Admission` in front of aiohttp's protocol factory
    (`AppRunner.server`), and the open connections are aiohttp's own list.
    """

    def __init__(
        self,
        name: str,
        app: web.Application,
        listen: str,
        limits: ConnectionLimits,
        on_refused: Callable[[str, str, str | None], None],
        ssl: SSLContext | None = None,
    ) -> None:
        self.name = name
        self.ssl = ssl
        self.app = app
        self.host, self._requested_port = split_listen(listen)
        self.limits = limits
        self._on_refused = on_refused
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            shutdown_timeout=SHUTDOWN_TIMEOUT_S,
            # Also closes a connection that has not sent a whole request header by then.
            keepalive_timeout=self.limits.idle_timeout_s,
            lingering_time=LINGER_S,
            auto_decompress=False,  # no Content-Encoding is accepted, so nothing to inflate
            logger=_ServerLog(self.name, self._on_refused),
        )
        await self._runner.setup()
        try:
            self._server = await asyncio.get_running_loop().create_server(
                lambda: _Admission(self),
                self.host,
                self._requested_port,
                backlog=self.limits.backlog,
                ssl=self.ssl,
                ssl_handshake_timeout=self.limits.idle_timeout_s if self.ssl else None,
            )
        except BaseException:
            await self._runner.cleanup()
            raise

    @property
    def port(self) -> int:
        """The bound port (useful when the config asked for port 0)."""
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.ssl else 'http'}://{host}:{self.port}"

    def admit(self, transport: asyncio.BaseTransport) -> asyncio.Protocol | None:
        """aiohttp's protocol for a new connection, or None after refusing it (503)."""
        assert self._runner is not None and self._runner.server is not None
        server = self._runner.server
        source = _peer_host(transport)
        open_ = server.connections
        if len(open_) >= self.limits.max_connections:
            detail = f"{len(open_)} connections open (max_connections)"
        elif (
            source is not None
            and sum(1 for h in open_ if _peer_host(h.transport) == source)
            >= self.limits.max_connections_per_address
        ):
            detail = f"{self.limits.max_connections_per_address} connections open from {source}"
        else:
            handler = server()
            # web.Server has no hook for its handler class; same slots, so the swap is safe.
            handler.__class__ = _RequestHandler
            if self.limits.first_read_bytes is not None and hasattr(transport, "max_size"):
                # asyncio's selector transport reads `max_size` bytes at a time (a class
                # attribute); this instance's reads are smaller until `_lift_read_cap`.
                transport.max_size = self.limits.first_read_bytes  # type: ignore[attr-defined]
            return handler
        transport.write(_BUSY)  # type: ignore[attr-defined]
        transport.close()
        self._on_refused(HttpReason.TOO_MANY_CONNECTIONS, detail, source)
        return None

    async def close(self) -> None:
        """Stop accepting, close every connection, wait (bounded) for the socket to close."""
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SHUTDOWN_TIMEOUT_S):
                    await self._server.wait_closed()


def _peer_host(transport: asyncio.BaseTransport | None) -> str | None:
    if transport is None:
        return None
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else None


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


# ---------------------------------------------------------------------------- both apps


@web.middleware
async def _plain_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Unknown paths and methods get a bare reason code, like every other refusal."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        _count_routing_refusal(request, "not_found")
        return web.json_response({"reason": "not_found"}, status=404)
    except web.HTTPMethodNotAllowed as exc:
        _count_routing_refusal(request, "method_not_allowed")
        return web.json_response(
            {"reason": "method_not_allowed"}, status=405, headers={"Allow": exc.headers["Allow"]}
        )


def _count_routing_refusal(request: web.Request, reason: str) -> None:
    """On the peer listener (the only app with upload slots), a request for a path or method
    it does not serve is counted like any other refusal, so a stranger's probing shows in
    /status and /metrics. The operator listener's clients are the hospital's own."""
    if UPLOADS_KEY in request.app:
        detail = f"{printable(request.method, 16)} {printable(request.path, 80)}"
        request.app[NODE_KEY].record_rejection(
            reason, detail, sender=None, round_=None, source=_source(request)
        )


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    # aiohttp would announce its and Python's versions to every client.
    response.headers[hdrs.SERVER] = "murmur"


def _new_app(middlewares: list[Any], client_max_size: int) -> web.Application:
    app = web.Application(middlewares=middlewares, client_max_size=client_max_size)
    app.on_response_prepare.append(_server_header)
    return app


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
    app = _new_app([_plain_errors, _peer_request], node.limits.max_message_bytes)
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


def _source(request: web.Request) -> str:
    return request.remote or "unknown"


def _refuse(request: web.Request, reason: str, detail: str, why: str | None = None) -> web.Response:
    """Count and log a refusal; the client gets the reason code and the connection closes
    (after a short linger, so it reads the answer rather than a reset)."""
    request.app[NODE_KEY].record_rejection(
        reason, detail, sender=None, round_=None, source=_source(request), why=why
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
    if request.app[UPLOADS_KEY].full(_source(request)):
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


async def read_peer_body(request: web.Request) -> bytes | web.Response:
    """An authenticated peer request's whole body, or the refusal to answer with (already
    counted): the header checks and authentication, one of the source address's upload slots
    and one of the peer's, the body timeout, a typed 4xx for every way reading can fail, and
    the body's SHA-256 against the signed one."""
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
    timeout_s = request.app[BODY_TIMEOUT_KEY]
    with request.app[UPLOADS_KEY].hold(_source(request)):
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


async def gossip(request: web.Request) -> web.Response:
    """POST /gossip: one envelope. The answer carries only the reason code."""
    body = await read_peer_body(request)
    if isinstance(body, web.Response):
        return body
    status_code, reason, _detail = await request.app[NODE_KEY].receive(
        body, source=_source(request), sender=authenticated_peer(request)
    )
    return web.json_response({"reason": reason}, status=status_code)


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


async def health(request: web.Request) -> web.Response:
    """GET /health: the node is up. Nothing else (no name, no round, nothing learnt)."""
    return web.json_response({"ok": True})


# ---------------------------------------------------------------------------- operator app


@dataclass(frozen=True)
class OperatorAuth:
    """How the operator listener tells its operators from everyone else."""

    token: str | None
    loopback: bool


class OperatorTokenError(ValueError):
    """The operator token file is missing, readable by others, or not a usable token."""


def load_operator_token(path: Path) -> str:
    """Read the operator's bearer token, refusing a file group or others could read, as
    private keys are refused (crypto/identity.py)."""
    fix = (
        f"create it with: (umask 077; python3 -c 'import secrets; "
        f"print(secrets.token_urlsafe(32))' > {path})"
    )
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise OperatorTokenError(f"operator.token_file {path} does not exist; {fix}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())  # the file actually read, not the path
        if not stat.S_ISREG(info.st_mode):
            raise OperatorTokenError(f"operator.token_file {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise OperatorTokenError(
                f"operator.token_file {path} has mode {mode:04o}, so other users can read it; "
                f"fix it with: chmod 600 {path}"
            )
        raw = handle.read(MAX_TOKEN_FILE_BYTES + 1)
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise OperatorTokenError(f"operator.token_file {path} is not ASCII; {fix}") from None
    if (
        len(raw) > MAX_TOKEN_FILE_BYTES
        or len(token) < MIN_TOKEN_CHARS
        or not all(c.isprintable() and not c.isspace() for c in token)
    ):
        raise OperatorTokenError(
            f"operator.token_file {path} must hold one token of at least {MIN_TOKEN_CHARS} "
            f"printable characters without spaces (a file under {MAX_TOKEN_FILE_BYTES} "
            f"bytes); {fix}"
        )
    return token


def build_operator_app(
    node: ServedNode, settings: OperatorSection, token: str | None
) -> web.Application:
    """The operator listener's application; its whole route table is here."""
    app = _new_app([_plain_errors, _operator_guard], OPERATOR_MAX_BODY)
    app[NODE_KEY] = node
    host, _ = split_listen(settings.listen, "operator.listen")
    app[AUTH_KEY] = OperatorAuth(token=token, loopback=is_loopback(host))
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", dashboard)
    app.router.add_get("/alerts", alerts)
    app.router.add_get("/audit/recent", audit_recent)
    return app


@web.middleware
async def _operator_guard(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """With a token: every request but the dashboard's static page needs
    `Authorization: Bearer TOKEN`. Without one (loopback only): the Host header must name
    loopback too, so a web page the operator visits cannot read /status by pointing its own
    domain at 127.0.0.1 (DNS rebinding)."""
    auth = request.app[AUTH_KEY]
    if auth.token is not None:
        if not (request.path == "/" and request.method in ("GET", "HEAD")) and not _bearer_ok(
            request, auth.token
        ):
            request.app[NODE_KEY].rejection_log.warning(
                "operator:unauthorized",
                "operator listener: %s %s from %s without the right token",
                request.method,
                printable(request.path, 80),
                request.remote,
            )
            return web.json_response(
                {"reason": "unauthorized"},
                status=401,
                headers={hdrs.WWW_AUTHENTICATE: 'Bearer realm="murmur operator"'},
            )
    elif not is_loopback(_host_name(request.headers.get(hdrs.HOST, ""))):
        return web.json_response({"reason": "not_loopback_host"}, status=421)
    return await handler(request)


def _bearer_ok(request: web.Request, token: str) -> bool:
    scheme, _, presented = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        presented.strip().encode(), token.encode()
    )


def _host_name(host_header: str) -> str:
    """'127.0.0.1:9700' -> '127.0.0.1', '[::1]:9700' -> '::1', 'localhost' -> 'localhost'."""
    if host_header.startswith("["):
        return host_header[1:].partition("]")[0]
    name, sep, port = host_header.rpartition(":")
    return name if sep and port.isdigit() else host_header


async def status(request: web.Request) -> web.Response:
    return web.json_response(request.app[NODE_KEY].status(), dumps=_dumps)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[NODE_KEY].metrics.render()
    return web.Response(
        body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


def _dumps(obj: object) -> str:
    return json.dumps(obj, default=str)
