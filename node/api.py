"""The node's HTTP: a peer listener for other nodes, an operator listener for its own people.

**Peer listener** (`[node] listen`): `POST /gossip` and `GET /health`, nothing else. Anyone
who can reach it can talk to it before any signature is checked, so everything here is sized
for strangers: a Content-Encoding or an oversize Content-Length is refused before the body
is read (and, with `Expect: 100-continue`, before it is even invited); a body must arrive
within `body_timeout_s`; connections are capped in all and per source address, idle ones are
closed, and each address may upload only a few bodies at once. Every refusal is a 4xx with a
reason code, counted in /status and /metrics, logged at most once per reason per interval
(node/rejections.py), and answered with the code alone: the detail stays in this node's log.
Nothing computed from training data is served here; /health says only that the node is up.

**Operator listener** (`[operator] listen`, loopback by default): `GET /status`, `/metrics`,
`/` (the dashboard) and the dashboard's `/alerts` and `/audit/recent` (node/dashboard.py).
They show per-round test metrics with exact counts and the decision threshold chosen on
training rows, which are the hospital's own business. A non-loopback bind needs
`allow_remote` and a bearer token (node/config.py refuses it otherwise).

Both route tables are in `build_peer_app` and `build_operator_app`, one line per route.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import stat
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs, web
from aiohttp.http import HttpProcessingError, HttpVersion11

from node.config import NodeConfig, OperatorSection, is_loopback, split_listen
from node.dashboard import alerts, audit_recent, dashboard
from node.rejections import RateLimitedLog, printable
from node.rollback import receipts_route

if TYPE_CHECKING:
    from node.node import HospitalNode

log = logging.getLogger("murmur.api")

NODE_KEY = web.AppKey("node", "HospitalNode")
UPLOADS_KEY = web.AppKey("uploads", "UploadSlots")
BODY_TIMEOUT_KEY = web.AppKey("body_timeout_s", float)
AUTH_KEY = web.AppKey("auth", "OperatorAuth")


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
    TOO_LARGE: 413,
}

# After refusing a request whose body is still coming, read and discard it for this long so
# the client sees the refusal instead of a connection reset, then close the connection.
LINGER_S = 2.0
# How long closing a listener waits for requests in flight (bodies are bounded by the body
# timeout; a node that is stopping should not wait for strangers).
SHUTDOWN_TIMEOUT_S = 2.0
OPERATOR_MAX_BODY = 1024  # the operator routes are all GETs
MAX_TOKEN_FILE_BYTES = 4096
MIN_TOKEN_CHARS = 32


@dataclass(frozen=True)
class ConnectionLimits:
    """How many connections one listener keeps, and for how long an idle one."""

    idle_timeout_s: float
    max_connections: int
    max_connections_per_address: int
    backlog: int = 128

    @classmethod
    def for_peers(cls, config: NodeConfig) -> ConnectionLimits:
        """`[peer_listener]` in docs/config.md."""
        s = config.peer_listener
        return cls(s.idle_timeout_s, s.max_connections, s.max_connections_per_address)


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
    ) -> None:
        self.name = name
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
        return f"http://{host}:{self.port}"

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
    """The node's two running listeners."""

    peer: Listener
    operator: Listener

    async def close(self) -> None:
        try:
            await self.peer.close()
        finally:
            await self.operator.close()


def operator_token(config: NodeConfig) -> str | None:
    """The operator's bearer token, if the config names a token file (which must be private:
    `load_operator_token`). Called before the node records or binds anything."""
    path = config.operator.token_file
    return load_operator_token(path) if path is not None else None


async def start_api(node: HospitalNode, token: str | None) -> NodeApi:
    """Bind the peer listener and the operator listener (which needs `token`, if any)."""
    config = node.config

    def refused(reason: str, detail: str, source: str | None) -> None:
        node.record_rejection(reason, detail, sender=None, round_=None, source=source)

    def refused_operator(reason: str, detail: str, source: str | None) -> None:
        node.rejection_log.warning(
            f"operator:{reason}", "operator listener refused a request (%s): %s", reason, detail
        )

    peer = Listener(
        "peer",
        build_peer_app(node),
        config.node.listen,
        ConnectionLimits.for_peers(config),
        refused,
    )
    operator = Listener(
        "operator",
        build_operator_app(node, config.operator, token),
        config.operator.listen,
        OPERATOR_LIMITS,
        refused_operator,
    )
    await peer.start()
    try:
        await operator.start()
    except BaseException:
        await peer.close()
        raise
    log.info("peer listener on %s, operator listener on %s", peer.address, operator.address)
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


def build_peer_app(node: HospitalNode) -> web.Application:
    """The peer listener's application; its whole route table is here.

    A route that takes a body from peers reads it with `read_peer_body` and is added with
    `expect_handler=expect_peer_body`, so that it has every limit /gossip has.
    """
    app = _new_app([_plain_errors], node.limits.max_message_bytes)
    app[NODE_KEY] = node
    app[BODY_TIMEOUT_KEY] = node.config.peer_listener.body_timeout_s
    app[UPLOADS_KEY] = UploadSlots(node.config.peer_listener.max_uploads_per_address)
    app.router.add_post("/gossip", gossip, expect_handler=expect_peer_body)
    app.router.add_post("/receipts", receipts_route, expect_handler=expect_peer_body)
    app.router.add_post("/probe", probe, expect_handler=expect_peer_body)
    app.router.add_get("/health", health)
    return app


def _source(request: web.Request) -> str:
    return request.remote or "unknown"


def _refuse(request: web.Request, reason: str, detail: str) -> web.Response:
    """Count and log a refusal; the client gets the reason code and the connection closes
    (after a short linger, so it reads the answer rather than a reset)."""
    request.app[NODE_KEY].record_rejection(
        reason, detail, sender=None, round_=None, source=_source(request)
    )
    response = web.json_response({"reason": reason}, status=HTTP_STATUS[reason])
    response.force_close()
    return response


def _refusal_before_body(request: web.Request) -> web.Response | None:
    """Everything that can be refused from the headers alone."""
    encoding = request.headers.get(hdrs.CONTENT_ENCODING)
    if encoding is not None:
        # Envelopes are encrypted, so compression never helps; and inflating a stranger's
        # bytes is how a small request becomes a large one.
        return _refuse(
            request,
            HttpReason.UNSUPPORTED_ENCODING,
            f"Content-Encoding {printable(encoding, 40)!r}",
        )
    limit = request.app[NODE_KEY].limits.max_message_bytes
    if request.content_length is not None and request.content_length > limit:
        return _refuse(request, TOO_LARGE, f"Content-Length {request.content_length} > {limit}")
    if request.app[UPLOADS_KEY].full(_source(request)):
        return _refuse(
            request,
            HttpReason.TOO_MANY_UPLOADS,
            f"{request.app[UPLOADS_KEY].per_address} uploads already in progress",
        )
    return None


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


async def read_peer_body(request: web.Request) -> bytes | web.Response:
    """A peer request's whole body, or the refusal to answer with (already counted): the
    header checks, one of the source address's upload slots, the body timeout, the size
    limit, and a typed 4xx for every way reading can fail."""
    refusal = _refusal_before_body(request)
    if refusal is not None:
        return refusal
    timeout_s = request.app[BODY_TIMEOUT_KEY]
    with request.app[UPLOADS_KEY].hold(_source(request)):
        try:
            async with asyncio.timeout(timeout_s):
                return await request.read()
        except TimeoutError:
            return _refuse(request, HttpReason.BODY_TIMEOUT, f"body not read within {timeout_s}s")
        except web.HTTPRequestEntityTooLarge:
            limit = request.app[NODE_KEY].limits.max_message_bytes
            return _refuse(request, TOO_LARGE, f"body over {limit} bytes")
        except ConnectionError:
            return _refuse(request, HttpReason.ABORTED_UPLOAD, "the sender disconnected")
        except (web.RequestPayloadError, HttpProcessingError) as exc:
            return _refuse(request, HttpReason.BAD_BODY, type(exc).__name__)


async def gossip(request: web.Request) -> web.Response:
    """POST /gossip: one envelope. The answer carries only the reason code."""
    body = await read_peer_body(request)
    if isinstance(body, web.Response):
        return body
    status_code, reason, _detail = request.app[NODE_KEY].receive(body, source=_source(request))
    return web.json_response({"reason": reason}, status=status_code)


async def probe(request: web.Request) -> web.Response:
    """POST /probe: does this node take the asking neighbour's envelopes (gossip/probe.py)?
    The answer carries only the verdict's reason code, as /gossip's does."""
    body = await read_peer_body(request)
    if isinstance(body, web.Response):
        return body
    status_code, reason = request.app[NODE_KEY].answer_probe(body)
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
    node: HospitalNode, settings: OperatorSection, token: str | None
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
