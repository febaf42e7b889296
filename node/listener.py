"""The node's two HTTP listeners, below the route tables: connection admission and limits,
error shaping, the HTTP layer's reason codes and what both applications share.

node/api.py builds the peer application and starts both listeners; node/operator_api.py builds
the operator application. Why apart: a listener's job (who may connect, how many, for how
long, how a malformed request is answered) is the same for both and knows no route.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from ssl import SSLContext
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs, web
from aiohttp.http import HttpProcessingError
from murmur.node.config import NodeConfig, split_listen
from murmur.node.rejections import RateLimitedLog, printable

if TYPE_CHECKING:
    pass

log = logging.getLogger("murmur.api")

NODE_KEY = web.AppKey("node", "ServedNode")
UPLOADS_KEY = web.AppKey("uploads", "UploadSlots")


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
OPERATOR_MAX_BODY = 16 * 1024  # GETs, and POST /governance: one signed record
FIRST_READ_BYTES = 16 * 1024  # ConnectionLimits.first_read_bytes of the peer listener


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


# ---------------------------------------------------------------------------- both apps


@web.middleware
async def plain_errors(
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
            reason, detail, sender=None, round_=None, source=request_source(request)
        )


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    # aiohttp would announce its and Python's versions to every client.
    response.headers[hdrs.SERVER] = "murmur"


def new_app(middlewares: list[Any], client_max_size: int) -> web.Application:
    app = web.Application(middlewares=middlewares, client_max_size=client_max_size)
    app.on_response_prepare.append(_server_header)
    return app


def request_source(request: web.Request) -> str:
    return request.remote or "unknown"
