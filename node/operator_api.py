"""The operator listener's application: `GET /status`, `/metrics`, `/` (the dashboard), and
the dashboard's `/alerts` and `/audit/recent` (node/dashboard.py), behind a bearer token or,
without one, a loopback-only Host check. node/api.py starts it; its whole route table is
`build_operator_app`.
"""

from __future__ import annotations

import hmac
import json
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import hdrs, web
from murmur.node.config import OperatorSection, is_loopback, split_listen
from murmur.node.dashboard import alerts, audit_recent, dashboard
from murmur.node.listener import NODE_KEY, OPERATOR_MAX_BODY, new_app, plain_errors
from murmur.node.rejections import printable

if TYPE_CHECKING:
    from murmur.node.served import ServedNode


AUTH_KEY = web.AppKey("auth", "OperatorAuth")
MAX_TOKEN_FILE_BYTES = 4096
MIN_TOKEN_CHARS = 32


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
    app = new_app([plain_errors, _operator_guard], OPERATOR_MAX_BODY)
    app[NODE_KEY] = node
    host, _ = split_listen(settings.listen, "operator.listen")
    app[AUTH_KEY] = OperatorAuth(token=token, loopback=is_loopback(host))
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", dashboard)
    app.router.add_get("/alerts", alerts)
    app.router.add_get("/audit/recent", audit_recent)
    app.router.add_post("/governance", operator_governance)
    app.router.add_post("/approvals", operator_approvals)
    return app


async def operator_approvals(request: web.Request) -> web.Response:
    """POST /approvals: this hospital's signed approvals or withdrawals of its study, as
    `murmur study withdraw --node` hands them to a running node (checked like a peer's)."""
    from murmur.node.studies.approvals import MAX_APPROVALS_BODY_BYTES

    body = await request.content.read(MAX_APPROVALS_BODY_BYTES + 1)
    if len(body) > MAX_APPROVALS_BODY_BYTES:
        return web.json_response({"reason": "too_large"}, status=413)
    status, reason = request.app[NODE_KEY].answer_approvals(body, None)
    return web.json_response({"reason": reason}, status=status)


async def operator_governance(request: web.Request) -> web.StreamResponse:
    """POST /governance: a signed proposal or vote (node/governance.py)."""
    from murmur.node.governance import operator_governance as handle

    return await handle(request)


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
