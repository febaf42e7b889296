"""Hostile inputs for a node's peer listener, and the harness that throws them at a REAL
training network of `murmur node` processes on loopback (issue #25 item 6).

Shared by tests/test_hostile.py (CI: a few hundred inputs, one network) and bench/hostile.py
(long: thousands of inputs, a clean run to compare AUC with, the CPU a 16 MB unauthenticated
request costs, and the re-signing insider), so both throw exactly the same bytes.

Why each piece is here:

- Every input is written with raw sockets (`asyncio.open_connection`), because half of them
  are things an HTTP library refuses to send: false Content-Lengths, broken chunk framing,
  bytes trickled one at a time, a body that never comes, a hang-up in the middle.
- Inputs come from many loopback source addresses (127.0.0.2 and up; the nodes talk to each
  other from 127.0.0.1), so the per-address caps refuse the attacker and not the honest peers,
  except in the classes that aim at those caps on purpose.
- Every answer is parsed back into (status, reason code), and every input says which refusals
  the node counts without being able to tell the client (`silent`: an upload whose sender hung
  up). So the node's own /status `rejected` counters can be checked against what was sent,
  reason by reason: a refusal nobody counted, or a count nobody caused, is a mismatch.
- Valid envelopes to replay, flip and truncate are captured on the wire by `CaptureProxy`, a
  transparent relay on one link, as an on-path eavesdropper would capture them: nothing is
  injected into training, so the attacked run learns exactly what a clean run learns.
- Envelopes are built only with gossip.wire's public `build_envelope` and `peek_envelope` (and
  tests.test_wire's `resign`, which the wire's own tests keep in step with the format), and
  signed requests only with `gossip.auth.request_headers`, the function every node uses, so
  a protocol change does not have to be repeated here.
- Since protocol v4 every POST needs a `Murmur-Auth` header of an admitted member, checked
  before the body is read (docs/protocol.md, "Request authentication"): a stranger's bytes,
  whatever they are, get `401 unauthenticated`, and the connection is closed. To still reach
  the checks behind it (body timeout, envelope decoding, replay, ...), those classes are sent
  by an **insider**: the network's offline member, admitted by everyone, whose key the harness
  holds and whose own traffic it cannot starve (its per-peer allowance is raised for this
  network, so that the allowance is not what refuses the inputs; tests/test_http.py tests it).

Every loop is bounded in count and in time, every wait has a timeout, and the network is
stopped (SIGTERM, then SIGKILL) whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import json
import os
import re
import signal
import time
import tomllib
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp
import msgpack
import numpy as np
from aiohttp import web
from murmur.crypto.identity import Identity, generate_identity, load_identity
from murmur.gossip.auth import AUTH_HEADER, request_headers
from murmur.gossip.rounds import InboxVerdict
from murmur.gossip.wire import ModelUpdate, RejectReason, build_envelope, peek_envelope
from murmur.node.api import TOO_LARGE, HttpReason
from murmur.node.audit import counts_by_kind, records_of_kind

import run_cluster
from tests.netutil import Network, make_network
from tests.test_wire import resign

# Reason codes a peer listener may answer or count: the envelope's, the HTTP layer's, the round
# layer's (an authentic envelope it will not use), and the router's. Anything else is untyped.
ROUTING_REASONS = frozenset({"not_found", "method_not_allowed"})
KNOWN_REASONS: frozenset[str] = (
    frozenset(r.value for r in RejectReason)
    | frozenset(r.value for r in HttpReason)
    | {TOO_LARGE}
    | frozenset(v.value for v in InboxVerdict if v is not InboxVerdict.ACCEPTED)
    | ROUTING_REASONS
)
# The one 5xx the peer listener answers by design: a connection over the caps, refused on
# accept (docs/protocol.md, "Refusals of the HTTP layer").
BUSY = (503, HttpReason.TOO_MANY_CONNECTIONS.value)
MiB = 2**20
HOST = b"Host: 127.0.0.1\r\n"
CLOSE = b"Connection: close\r\n"


# ---------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class HostileInput:
    """One hostile connection to one node's peer listener.

    `chunks` are written in order, `pause_s` apart (a trickle), while the answer is read;
    with `hang_up` the client closes its side after the last chunk instead of reading.
    `silent` are the refusals the node counts that can never reach this client. With
    `requests` > 0 the chunks are that many complete requests sent one after another on one
    keep-alive connection, each answer read before the next is written.
    """

    kind: str
    target: str
    chunks: tuple[bytes, ...]
    pause_s: float = 0.0
    hang_up: bool = False
    silent: tuple[str, ...] = ()
    read_timeout_s: float = 10.0
    head: bool = False  # a HEAD request: its answer has no body
    requests: int = 0  # > 0: keep-alive, one answer per chunk
    wait_first_s: float = 0.0  # flood: wait this long for an answer before writing anything
    # What the node counts when it refuses while the client is still writing: it closes with
    # unread data, the kernel resets the connection, and the answer is lost on the way.
    if_reset: tuple[str, ...] = ()


@dataclass
class Answer:
    """What came back on one connection: every response, as (status, reason code or None
    when the body is not a JSON reason), and how the connection ended."""

    kind: str
    target: str
    responses: list[tuple[int, str | None]] = field(default_factory=list)
    silent: tuple[str, ...] = ()
    if_reset: tuple[str, ...] = ()
    closed_by_node: bool = False
    error: str | None = None  # a client-side failure: connect, reset, timeout
    seconds: float = 0.0
    got_continue: bool = False  # "100 Continue" came (the body was invited)
    sent: int = 1  # requests written (a keep-alive connection carries several)

    def counted(self) -> Counter[str]:
        """The refusals the node must have counted for this connection."""
        counts = Counter(r for s, r in self.responses if r is not None and s >= 400)
        counts.update(self.silent)
        if not self.responses and self.error == "ConnectionResetError":
            counts.update(self.if_reset)
        # An answer the node sent as something other than a JSON reason still was a refusal.
        counts.update("(untyped)" for s, r in self.responses if r is None and s >= 400)
        return counts


def request(
    method: bytes,
    path: bytes,
    body: bytes = b"",
    *headers: bytes,
    length: int | None = None,
    version: bytes = b"HTTP/1.1",
    close: bool = True,
) -> bytes:
    """A request's bytes: `Content-Length: length` (default: the body's length; -1 leaves the
    header out, true or not) and `Connection: close` unless `close` is False."""
    lines = [method + b" " + path + b" " + version + b"\r\n", HOST, *headers]
    if length is None:
        length = len(body)
    if length >= 0:
        lines.append(b"Content-Length: %d\r\n" % length)
    if close:
        lines.append(CLOSE)
    return b"".join([*lines, b"\r\n", body])


def gossip_post(body: bytes, *headers: bytes, close: bool = True) -> bytes:
    return request(b"POST", b"/gossip", body, *headers, close=close)


def auth_line(sender: Identity, recipient: bytes, body: bytes, path: str = "/gossip") -> bytes:
    """The `Murmur-Auth` header line `sender` would send with `body` to `recipient`."""
    value = request_headers(sender, recipient, path, body, "application/x-murmur-envelope")
    return f"{AUTH_HEADER}: {value[AUTH_HEADER]}\r\n".encode()


def signed_post(
    body: bytes, sender: Identity, recipient: bytes, *headers: bytes, close: bool = True
) -> bytes:
    """POST /gossip of `body` as the member `sender` sends it: authenticated, so the node
    reads the body and its own checks apply."""
    return gossip_post(body, auth_line(sender, recipient, body), *headers, close=close)


def signed_head(sender: Identity, recipient: bytes, declared: bytes, *headers: bytes) -> bytes:
    """A signed request head for a body of `len(declared)` bytes hashing like `declared`,
    without the body: for senders that then send less, slower, or nothing."""
    return request(
        b"POST",
        b"/gossip",
        b"",
        auth_line(sender, recipient, declared),
        *headers,
        length=len(declared),
    )


def chunked(body: bytes, size: int = 16 * 1024) -> list[bytes]:
    """`body` in HTTP/1.1 chunked framing (without the request head), ending with 0."""
    parts = [
        b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size])
        for i in range(0, len(body), size)
    ]
    return [*parts, b"0\r\n\r\n"]


def model_update(tensors: dict[str, np.ndarray]) -> ModelUpdate:
    """A ModelUpdate whatever the protocol version: version 3 drops `num_samples` from the
    body (and, with it, from ModelUpdate), so it is passed only where the field exists."""
    names = {f.name for f in dataclasses.fields(ModelUpdate)}
    return ModelUpdate(tensors=tensors, **({"num_samples": 1} if "num_samples" in names else {}))


SIGNATURE_KEY = msgpack.packb("signature") + b"\xc4\x40"  # the key, then a 64-byte bin header


def with_bad_signature(envelope: bytes) -> bytes:
    """The envelope with one bit of its Ed25519 signature flipped: still canonical and
    well-formed, the same sender, recipients, timestamp and nonce, but no longer signed."""
    at = envelope.index(SIGNATURE_KEY) + len(SIGNATURE_KEY)
    return envelope[:at] + bytes([envelope[at] ^ 0x01]) + envelope[at + 1 :]


def filler_envelope(
    sender: Identity, recipients: Sequence[bytes], size: int, round_: int = 1
) -> bytes:
    """A valid envelope of about `size` bytes (one float32 tensor of filler). Its tensor does
    not match any node's model, which does not matter to the checks that come before the
    body is decrypted; sent as it is it would be `shape_mismatch` at best."""
    n = max(1, (size - 4096) // 4)
    tensors = {"filler": np.zeros(n, dtype=np.float32)}
    return build_envelope(model_update(tensors), sender, list(recipients), round_)


def msgpack_bombs() -> list[bytes]:
    """Bodies that make a careless msgpack decoder recurse, allocate or loop: deep nesting,
    declared lengths of 4 G items or bytes with nothing behind them, ext types, and the same
    bombs inside an envelope-shaped map (where a decoder has already started to trust it)."""
    depth = 100_000
    bombs = [
        b"\x91" * depth + b"\xc0",  # [[[[...nil...]]]]: 100k levels of fixarray
        b"\x81\xa1k" * depth + b"\xc0",  # {"k": {"k": ...}}: 100k levels of fixmap
        b"\xdd\xff\xff\xff\xff" + b"\xc0" * 64,  # array32 of 2^32-1 items, 64 present
        b"\xdf\xff\xff\xff\xff" + b"\xc0" * 64,  # map32 of 2^32-1 pairs
        b"\xc6\xff\xff\xff\xff" + b"x" * 64,  # bin32 of 4 GiB, 64 bytes present
        b"\xdb\xff\xff\xff\xff" + b"x" * 64,  # str32 of 4 GiB
        b"\xc9\xff\xff\xff\xff\x01" + b"x" * 64,  # ext32 of 4 GiB
        b"\xd4\x01\x00",  # fixext1: ext types are not allowed at all
        b"\xdc\xff\xff" + b"\xdc\xff\xff" * 64,  # array16 of arrays16 of 65535 items each
    ]
    shaped = {
        "version": 2,
        "kind": "update",
        "sender": b"\x00" * 32,
        "round": 1,
        "timestamp_ms": int(time.time() * 1000),
        "nonce": b"\x00" * 24,
        "ephemeral_key": b"\x00" * 32,
    }
    head = msgpack.packb(shaped)
    # The same map with three more entries, the third of which is a bomb.
    envelope_map = b"\x8a" + head[1:] + msgpack.packb("recipients")
    bombs += [
        envelope_map + b"\x91" * depth + b"\xc0",
        envelope_map + b"\xdd\xff\xff\xff\xff" + b"\x92\xc4\x20" + b"\x00" * 32,
        envelope_map + b"\x91\x92\xc4\x20" + b"\x00" * 32 + b"\xc6\xff\xff\xff\xff",
    ]
    return bombs


def _gzip_bomb(size: int) -> bytes:
    return gzip.compress(b"\0" * size, compresslevel=9)


@dataclass
class InputContext:
    """What the generators need to know about the network under attack."""

    targets: list[str]  # node names that take hostile inputs
    limits: dict[str, int]  # node name -> its maximum message size
    body_timeout_s: float
    members: dict[str, Identity]  # node name -> its key (the harness holds every key)
    captured: list[bytes] = field(default_factory=list)  # valid envelopes seen on the wire
    # the Murmur-Auth header each of them was posted with (an eavesdropper sees both)
    captured_auth: list[str] = field(default_factory=list)
    capture_target: str = ""  # the node that accepted the captured envelopes
    capture_author: str = ""  # the node that signed them
    outsider: Identity = field(default_factory=lambda: generate_identity("mallory"))
    insider: str = ""  # an admitted member that sends nothing of its own (the offline one)

    def key(self, name: str) -> bytes:
        return self.members[name].public_key

    def as_insider(self, body: bytes, target: str, *headers: bytes, close: bool = True) -> bytes:
        """`body` posted to `target` by the insider (an authenticated request)."""
        return signed_post(
            body, self.members[self.insider], self.key(target), *headers, close=close
        )


Generator = Callable[[np.random.Generator, int, InputContext], list[HostileInput]]


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def gen_random_bytes(rng: np.random.Generator, n: int, ctx: InputContext) -> list[HostileInput]:
    """Random bodies of 1 B to 4 KiB from strangers: the bulk of the junk (the input the
    audit-row and log-line budgets are about). One per connection: a node closes a stranger's
    connection after refusing it (`unauthenticated`), so keep-alive buys a stranger nothing."""
    per_connection = 1
    inputs = []
    for start in range(0, n, per_connection):
        count = min(per_connection, n - start)
        bodies = [rng.bytes(int(rng.integers(1, 4097))) for _ in range(count)]
        chunks = tuple(gossip_post(body, close=i == count - 1) for i, body in enumerate(bodies))
        inputs.append(HostileInput("random_bytes", _pick(rng, ctx.targets), chunks, requests=count))
    return inputs


def gen_truncated(rng: np.random.Generator, n: int, ctx: InputContext) -> list[HostileInput]:
    """Prefixes of a valid captured envelope, cut anywhere (including 0 and length - 1),
    posted by the insider: the envelope decoder must refuse every one."""
    envelope = ctx.captured[0]
    cuts = [0, 1, len(envelope) - 1, *(int(c) for c in rng.integers(2, len(envelope) - 1, n))]
    return [
        HostileInput(
            "truncated", ctx.capture_target, (ctx.as_insider(envelope[:cut], ctx.capture_target),)
        )
        for cut in cuts[:n]
    ]


def gen_bit_flips(rng: np.random.Generator, n: int, ctx: InputContext) -> list[HostileInput]:
    """A valid captured envelope with 1 to 8 random bits flipped, to the node that accepted
    it, posted by the insider: whatever a flip hits (structure, sender, timestamp,
    signature, body) must be refused with a code, never accepted and never a crash."""
    inputs = []
    for _ in range(n):
        data = bytearray(_pick(rng, ctx.captured))
        for _ in range(int(rng.integers(1, 9))):
            bit = int(rng.integers(len(data) * 8))
            data[bit // 8] ^= 1 << (bit % 8)
        post = ctx.as_insider(bytes(data), ctx.capture_target)
        inputs.append(HostileInput("bit_flips", ctx.capture_target, (post,)))
    return inputs


def gen_empty(rng: np.random.Generator, n: int, ctx: InputContext) -> list[HostileInput]:
    """Empty bodies every way HTTP allows: Content-Length 0, no length at all, chunked with
    only the last chunk."""
    variants = [
        gossip_post(b""),
        request(b"POST", b"/gossip", length=-1),
        request(b"POST", b"/gossip", b"0\r\n\r\n", b"Transfer-Encoding: chunked\r\n", length=-1),
    ]
    return [
        HostileInput("empty", ctx.targets[i % len(ctx.targets)], (variants[i % len(variants)],))
        for i in range(n)
    ]


def gen_length_short(rng: np.random.Generator, n: int, ctx: InputContext) -> list[HostileInput]:
    """Content-Length shorter than the body: whatever follows the declared bytes is the next
    request on the connection. It arrives in the same buffer, so the parser refuses the
    whole connection (400 bad_http, one answer); arriving later, the declared bytes would be
    refused as an envelope first (malformed), then the rest."""
    inputs = []
    for _ in range(n):
        body = rng.bytes(int(rng.integers(64, 2048)))
        length = int(rng.integers(1, len(body)))
        # The rest starts with a byte no HTTP method has, so it is refused at once rather
        # than waited on as the start of a request line.
        rest = b"\x00" + body[length + 1 :]
        head = request(b"POST", b"/gossip", length=length, close=False)
        inputs.append(
            HostileInput("length_short", _pick(rng, ctx.targets), (head + body[:length] + rest,))
        )
    return inputs


def gen_length_long(rng: np.random.Generator, n: int, ctx: InputContext) -> list[HostileInput]:
    """Content-Length longer than the body, from the insider (a stranger's is refused from
    its headers): half wait (the node gives up at its body timeout, 408), half hang up (the
    node counts an aborted upload no one hears about)."""
    inputs = []
    for i in range(n):
        body = rng.bytes(int(rng.integers(16, 1024)))
        target = _pick(rng, ctx.targets)
        declared = body + bytes(int(rng.integers(1, 10_000)))
        head = signed_head(ctx.members[ctx.insider], ctx.key(target), declared)
        if i % 2 == 0:
            inputs.append(
                HostileInput(
                    "length_long",
                    target,
                    (head + body,),
                    read_timeout_s=ctx.body_timeout_s + 5,
                )
            )
        else:
            inputs.append(
                HostileInput(
                    "length_long",
                    target,
                    (head + body,),
                    hang_up=True,
                    silent=(HttpReason.ABORTED_UPLOAD.value,),
                )
            )
    return inputs


def gen_oversize(rng: np.random.Generator, n: int, ctx: InputContext) -> list[HostileInput]:
    """Bodies over the node's limit: declared by Content-Length (refused from the headers),
    chunked without a length (read up to the limit, then refused), and HTTP/1.0 without a
    length (no body at all for the parser: the bytes are junk after the request)."""
    inputs = []
    for i in range(n):
        target = ctx.targets[i % len(ctx.targets)]
        limit = ctx.limits[target]
        variant = i % 3
        if variant == 0:
            head = request(b"POST", b"/gossip", length=limit + 1 + int(rng.integers(10**9)))
            chunks: tuple[bytes, ...] = (head, rng.bytes(64 * 1024))
            on_reset: tuple[str, ...] = (TOO_LARGE,)
        elif variant == 1:
            # Chunked: no Content-Length to sign, so refused from its headers (401).
            head = request(b"POST", b"/gossip", b"", b"Transfer-Encoding: chunked\r\n", length=-1)
            block = b"%x\r\n%s\r\n" % (MiB, b"\xa5" * MiB)
            chunks = (head, *[block] * (limit // MiB + 2), b"0\r\n\r\n")
            on_reset = (HttpReason.UNAUTHENTICATED.value,)
        else:
            # One write, so that the parser meets the head and the bytes after it together.
            head = request(b"POST", b"/gossip", version=b"HTTP/1.0", length=-1, close=False)
            chunks = (head + rng.bytes(min(limit + 1, 4 * MiB)),)
            on_reset = (HttpReason.BAD_HTTP.value,)
        inputs.append(HostileInput("oversize", target, chunks, if_reset=on_reset))
    return inputs


def gen_trickle(rng: np.random.Generator, n: int, ctx: InputContext) -> list[HostileInput]:
    """A body trickled one byte at a time, 10 per second, by the insider: it cannot arrive
    within the body timeout and is cut there (408), however long the sender would have kept
    it up."""
    inputs = []
    for _ in range(n):
        body = rng.bytes(10_000)
        target = _pick(rng, ctx.targets)
        head = signed_head(ctx.members[ctx.insider], ctx.key(target), body)
        parts = (head, *(body[i : i + 1] for i in range(int(ctx.body_timeout_s * 10) + 50)))
        inputs.append(
            HostileInput(
                "trickle",
                target,
                parts,
                pause_s=0.1,
                read_timeout_s=ctx.body_timeout_s + 10,
            )
        )
    return inputs


def gen_trickle_headers(
    rng: np.random.Generator, n: int, ctx: InputContext, idle_timeout_s: float = 15.0
) -> list[HostileInput]:
    """Slowloris: a request header trickled one byte per 0.5 s. No request ever forms, so
    nothing is counted; the node must close the connection at its idle timeout."""
    head = b"POST /gossip HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"s" * 200
    steps = int(idle_timeout_s * 2) + 20
    return [
        HostileInput(
            "trickle_headers",
            ctx.targets[i % len(ctx.targets)],
            tuple(head[j : j + 1] for j in range(steps)),
            pause_s=0.5,
            read_timeout_s=idle_timeout_s + 15,
        )
        for i in range(n)
    ]


def gen_bad_framing(rng: np.random.Generator, n: int, ctx: InputContext) -> list[HostileInput]:
    """Requests the HTTP parser must refuse (400 bad_http): not HTTP at all, a negative,
    duplicated, overflowing or conflicting length, broken chunk framing, a NUL in a header, a
    header or request line over 8190 bytes, too many headers, HTTP/2's preface."""
    variants = [
        b"\x00\x01\x02 not http at all\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        request(b"POST", b"/gossip", b"x", b"Content-Length: -1\r\n", length=-1),
        request(b"POST", b"/gossip", b"123456", b"Content-Length: 5\r\n", length=6),
        request(
            b"POST", b"/gossip", b"", b"Content-Length: 99999999999999999999999\r\n", length=-1
        ),
        request(b"POST", b"/gossip", b"0\r\n\r\n", b"Transfer-Encoding: chunked\r\n", length=5),
        request(
            b"POST",
            b"/gossip",
            b"zz\r\nab\r\n0\r\n\r\n",
            b"Transfer-Encoding: chunked\r\n",
            length=-1,
        ),
        request(b"POST", b"/gossip", b"", b"X-Nul: a\x00b\r\n"),
        request(b"POST", b"/gossip", b"", b"X-Long: " + b"h" * 9000 + b"\r\n"),
        request(b"POST", b"/gossip", b"", *(b"X-%d: a\r\n" % i for i in range(200))),
        request(b"GET", b"/" + b"p" * 9000),
        request(b"post", b"/gossip"),
        request(b"BREW", b"/gossip"),
    ]
    return [
        HostileInput(
            "bad_framing", ctx.targets[i % len(ctx.targets)], (variants[i % len(variants)],)
        )
        for i in range(n)
    ]


def gen_expect(rng: np.random.Generator, n: int, ctx: InputContext) -> list[HostileInput]:
    """`Expect: 100-continue` with a huge length (refused from the headers, 413, before the
    body is invited) and an Expect the node does not know (417)."""
    inputs = []
    for i in range(n):
        target = ctx.targets[i % len(ctx.targets)]
        if i % 2 == 0:
            huge = ctx.limits[target] + 1 + int(rng.integers(10**12))
            head = request(b"POST", b"/gossip", b"", b"Expect: 100-continue\r\n", length=huge)
        else:
            head = ctx.as_insider(b"abcd", target, b"Expect: 200-ok\r\n")
        inputs.append(HostileInput("expect", target, (head,)))
    return inputs


def gen_content_encoding(rng: np.random.Generator, n: int, ctx: InputContext) -> list[HostileInput]:
    """Compressed bodies, several of them bombs (20 MB of zeros in 20 KB): any
    Content-Encoding is refused unread (415); a gzip Transfer-Encoding is not inflated either
    (if it were, the bomb would be `too_large` or worse; it is read as 20 KB of junk)."""
    bomb = _gzip_bomb(20 * MiB)
    variants: list[tuple[bytes, ...]] = [
        (gossip_post(bomb, b"Content-Encoding: gzip\r\n"),),
        (gossip_post(zlib.compress(b"\0" * 20 * MiB, 9), b"Content-Encoding: deflate\r\n"),),
        (gossip_post(b"\x1f\x8b not gzip", b"Content-Encoding: gzip\r\n"),),
        (gossip_post(bomb, b"Content-Encoding: gzip, deflate\r\n"),),
        (gossip_post(b"x", b"Content-Encoding: br\r\n"),),
        (gossip_post(b"x", b"Content-Encoding: identity\r\n"),),
        (
            request(b"POST", b"/gossip", b"", b"Transfer-Encoding: gzip, chunked\r\n", length=-1),
            *chunked(bomb),
        ),
    ]
    return [
        HostileInput(
            "content_encoding", ctx.targets[i % len(ctx.targets)], variants[i % len(variants)]
        )
        for i in range(n)
    ]


def gen_msgpack_bombs(rng: np.random.Generator, n: int, ctx: InputContext) -> list[HostileInput]:
    """The bombs, posted by the insider, so that the envelope decoder meets them."""
    bombs = msgpack_bombs()
    inputs = []
    for i in range(n):
        target = ctx.targets[i % len(ctx.targets)]
        post = ctx.as_insider(bombs[i % len(bombs)], target)
        inputs.append(HostileInput("msgpack_bombs", target, (post,)))
    return inputs


def gen_outsider(rng: np.random.Generator, n: int, ctx: InputContext) -> list[HostileInput]:
    """Envelopes signed by a key that is not on the allowlist: posted by the outsider itself
    (its request signature is not admitted: unauthenticated, before the body), handed on by
    the insider (unknown_sender, before any envelope signature check), and naming the insider
    as the sender with the outsider's signature, posted by the insider (bad_signature)."""
    inputs = []
    for i in range(n):
        target = ctx.targets[i % len(ctx.targets)]
        me = ctx.key(target)
        envelope = filler_envelope(ctx.outsider, [me], 2048, round_=1)
        if i % 3 == 0:
            post = signed_post(envelope, ctx.outsider, me)
        elif i % 3 == 1:
            post = ctx.as_insider(envelope, target)
        else:
            forged = resign(envelope, signer=ctx.outsider, sender=ctx.key(ctx.insider))
            post = ctx.as_insider(forged, target)
        inputs.append(HostileInput("outsider", target, (post,)))
    return inputs


def gen_replay(rng: np.random.Generator, n: int, ctx: InputContext) -> list[HostileInput]:
    """Captured envelopes sent again. An eavesdropper has the request too: played again as
    captured, to the node that accepted it or to the envelope's author, it is refused from
    its headers (the request's nonce is spent; it is addressed to another node). Handed on
    by the insider it is not the insider's (sender_mismatch). (Only its author could make it
    reach the envelope's own replay guard: tests/test_http.py.)"""
    inputs = []
    for i in range(n):
        k = int(rng.integers(len(ctx.captured)))
        envelope, auth = ctx.captured[k], ctx.captured_auth[k]
        target = ctx.capture_target
        if i % 3 == 0:
            target = ctx.capture_author
            post = gossip_post(envelope, f"{AUTH_HEADER}: {auth}\r\n".encode())
        elif i % 3 == 1:
            post = gossip_post(envelope, f"{AUTH_HEADER}: {auth}\r\n".encode())
        else:
            post = ctx.as_insider(envelope, target)
        inputs.append(HostileInput("replay", target, (post,)))
    return inputs


def gen_wrong_route(rng: np.random.Generator, n: int, ctx: InputContext) -> list[HostileInput]:
    """Methods the peer listener does not serve on /gossip or /health (405), and paths it does
    not serve at all, including the operator's (404)."""
    variants: list[tuple[bytes, bytes, bool]] = [
        (b"GET", b"/gossip", False),
        (b"PUT", b"/gossip", False),
        (b"DELETE", b"/gossip", False),
        (b"PATCH", b"/gossip", False),
        (b"HEAD", b"/gossip", True),
        (b"OPTIONS", b"/gossip", False),
        (b"POST", b"/health", False),
        (b"GET", b"/status", False),
        (b"GET", b"/metrics", False),
        (b"POST", b"/gossip/", False),
        (b"POST", b"/GOSSIP", False),
        (b"GET", b"/../../etc/passwd", False),
        (b"GET", b"/%2e%2e/status", False),
        (b"OPTIONS", b"*", False),
        (b"CONNECT", b"127.0.0.1:443", False),
    ]
    inputs = []
    for i in range(n):
        method, path, head = variants[i % len(variants)]
        inputs.append(
            HostileInput(
                "wrong_route",
                ctx.targets[i % len(ctx.targets)],
                (request(method, path, b"x" if method in (b"POST", b"PUT", b"PATCH") else b""),),
                head=head,
            )
        )
    return inputs


def gen_concurrent(rng: np.random.Generator, n: int, ctx: InputContext) -> list[HostileInput]:
    """`n` connections opened at once against one node, 10 from each of many source
    addresses (under the per-address cap): past `max_connections` they are refused on accept (503
    too_many_connections); those let in wait 0.3 s, holding their slot, then send junk."""
    target = ctx.targets[0]
    return [
        HostileInput(
            "concurrent",
            target,
            (gossip_post(rng.bytes(256)),),
            wait_first_s=0.3,
            read_timeout_s=15.0,
        )
        for _ in range(n)
    ]


def gen_upload_cap(rng: np.random.Generator, n: int, ctx: InputContext) -> list[HostileInput]:
    """`n` uploads at once from ONE address, each a body that never finishes, by the insider
    (only an authenticated upload is read at all): past `max_uploads_per_address` they are
    refused before their body is read (429), the others run into the body timeout (408)."""
    target = ctx.targets[-1]
    insider = ctx.members[ctx.insider]
    return [
        HostileInput(
            "upload_cap",
            target,
            (signed_head(insider, ctx.key(target), b"partial" + bytes(4089)) + b"partial",),
            read_timeout_s=ctx.body_timeout_s + 10,
        )
        for _ in range(n)
    ]


def gen_unauth_16mb(rng: np.random.Generator, n: int, ctx: InputContext) -> list[HostileInput]:
    """A 16 MB envelope naming an allowlisted sender, with a bad signature, to the node whose
    limit admits it: what an unauthenticated stranger could make a v3 node read, decode and
    hash. Since v4 it is refused from its headers (no `Murmur-Auth`) before a byte is read."""
    target = max(ctx.limits, key=ctx.limits.__getitem__)
    envelope = unauth_16mb_envelope(ctx, target)
    return [HostileInput("unauth_16mb", target, (gossip_post(envelope),)) for _ in range(n)]


def unauth_16mb_envelope(ctx: InputContext, target: str) -> bytes:
    member = next(name for name in ctx.members if name != target)
    envelope = filler_envelope(ctx.members[member], [ctx.members[target].public_key], 16 * MiB)
    return with_bad_signature(envelope)


# The refusals each class may get (and "(silent)" ones: counted, never heard). Anything
# else is a surprise worth a look even when typed; bit flips may hit any check at all.
ANY = frozenset({"*"})
EXPECTED: dict[str, frozenset[str]] = {
    "random_bytes": frozenset({"unauthenticated"}),
    "truncated": frozenset({"malformed"}),
    "bit_flips": ANY,
    "empty": frozenset({"unauthenticated"}),
    "length_short": frozenset({"bad_http", "unauthenticated"}),
    "length_long": frozenset({"body_timeout", "aborted_upload (silent)"}),
    "oversize": frozenset({"too_large", "bad_http", "unauthenticated"}),
    "trickle": frozenset({"body_timeout"}),
    "trickle_headers": frozenset(),
    "bad_framing": frozenset({"bad_http"}),
    "expect": frozenset({"too_large", "unsupported_expect"}),
    "content_encoding": frozenset({"unsupported_encoding", "unauthenticated"}),
    "msgpack_bombs": frozenset({"malformed"}),
    "outsider": frozenset({"unauthenticated", "unknown_sender", "bad_signature"}),
    "replay": frozenset({"unauthenticated", "sender_mismatch"}),
    "wrong_route": frozenset({"not_found", "method_not_allowed"}),
    "concurrent": frozenset({"too_many_connections", "unauthenticated"}),
    "upload_cap": frozenset({"too_many_uploads", "body_timeout"}),
    "unauth_16mb": frozenset({"unauthenticated"}),
}


# The classes whose inputs are (some or all) posted by the insider, an admitted member: their
# refusals are audited one record each, under its name.
INSIDER_CLASSES = frozenset(
    {
        "truncated",
        "bit_flips",
        "length_long",
        "trickle",
        "expect",
        "msgpack_bombs",
        "outsider",
        "replay",
        "upload_cap",
    }
)

# name -> (generator, whether it needs captured envelopes)
GENERATORS: dict[str, tuple[Generator, bool]] = {
    "random_bytes": (gen_random_bytes, False),
    "truncated": (gen_truncated, True),
    "bit_flips": (gen_bit_flips, True),
    "empty": (gen_empty, False),
    "length_short": (gen_length_short, False),
    "length_long": (gen_length_long, False),
    "oversize": (gen_oversize, False),
    "trickle": (gen_trickle, False),
    "trickle_headers": (gen_trickle_headers, False),
    "bad_framing": (gen_bad_framing, False),
    "expect": (gen_expect, False),
    "content_encoding": (gen_content_encoding, False),
    "msgpack_bombs": (gen_msgpack_bombs, False),
    "outsider": (gen_outsider, False),
    "replay": (gen_replay, True),
    "wrong_route": (gen_wrong_route, False),
    "concurrent": (gen_concurrent, False),
    "upload_cap": (gen_upload_cap, False),
    "unauth_16mb": (gen_unauth_16mb, False),
}


# ---------------------------------------------------------------------------- the client


@dataclass
class _Response:
    status: int
    reason: str | None
    close: bool  # the node said this is the last answer on the connection


_STATUS_LINE = re.compile(rb"^HTTP/(\d)\.(\d) (\d{3})")


def parse_responses(data: bytes, head: bool = False) -> tuple[list[_Response], bool]:
    """Every complete response in `data` (interim 1xx skipped), and whether a 100 Continue
    was among them. A response whose body is not `{"reason": CODE}` has reason None."""
    responses = []
    got_continue = False
    while data:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            break
        lines = data[:end].split(b"\r\n")
        match = _STATUS_LINE.match(lines[0])
        if match is None:
            responses.append(_Response(0, None, True))
            break
        status = int(match.group(3))
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        rest = data[end + 4 :]
        if 100 <= status < 200:
            got_continue |= status == 100
            data = rest
            continue
        length = 0 if head else int(headers.get(b"content-length", b"0") or 0)
        if len(rest) < length:
            break
        body, data = rest[:length], rest[length:]
        reason = None
        with contextlib.suppress(ValueError, AttributeError):
            code = json.loads(body).get("reason")
            reason = code if isinstance(code, str) else None
        if head and status in (404, 405):
            reason = {404: "not_found", 405: "method_not_allowed"}[status]
        close = headers.get(b"connection") == b"close" or match.group(2) == b"0"
        responses.append(_Response(status, reason, close))
    return responses, got_continue


async def _read(
    reader: asyncio.StreamReader, timeout_s: float, head: bool, want: int | None
) -> tuple[bytes, bool, str | None]:
    """Read until the node closes, or says it will (`Connection: close`), or `want` answers
    are complete, or `timeout_s` passes. Returns (bytes, closed by the node, error)."""
    data = b""
    try:
        async with asyncio.timeout(timeout_s):
            while chunk := await reader.read(256 * 1024):
                data += chunk
                responses, _ = parse_responses(data, head)
                if responses and (responses[-1].close or (want and len(responses) >= want)):
                    return data, False, None
            return data, True, None
    except TimeoutError:
        return data, False, "timeout"
    except ConnectionError as exc:
        return data, False, type(exc).__name__


async def exchange(inp: HostileInput, port: int, source: str) -> Answer:
    """Throw one input at 127.0.0.1:`port` from `source` and collect what comes back."""
    answer = Answer(inp.kind, inp.target, silent=inp.silent, if_reset=inp.if_reset)
    started = time.monotonic()
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0)
            )
    except (OSError, TimeoutError) as exc:
        answer.error = f"connect: {type(exc).__name__}"
        answer.silent, answer.sent = (), 0
        return answer
    try:
        if inp.requests:
            data, closed, error, answer.sent = await _keep_alive(inp, reader, writer)
        else:
            data, closed, error = await _raw(inp, reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1)
    responses, answer.got_continue = parse_responses(data, inp.head)
    answer.responses = [(r.status, r.reason) for r in responses]
    answer.closed_by_node, answer.error = closed, error
    answer.seconds = time.monotonic() - started
    return answer


async def _raw(
    inp: HostileInput, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> tuple[bytes, bool, str | None]:
    if inp.wait_first_s:
        # A flood connection: a connection over the caps is answered on accept, unasked.
        early, closed, error = await _read(reader, inp.wait_first_s, False, 1)
        if early or closed:
            return early, closed, None if error == "timeout" else error
    if inp.hang_up:
        with contextlib.suppress(ConnectionError):
            for chunk in inp.chunks:
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 10)
        return b"", False, None
    reading = asyncio.create_task(_read(reader, inp.read_timeout_s, inp.head, None))
    write_error = None
    try:
        for i, chunk in enumerate(inp.chunks):
            if reading.done():
                break
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), inp.read_timeout_s)
            if inp.pause_s and i < len(inp.chunks) - 1:
                await asyncio.wait({reading}, timeout=inp.pause_s)
    except (ConnectionError, TimeoutError) as exc:
        write_error = type(exc).__name__  # the node stopped reading; its answer is still read
    data, closed, error = await reading
    return data, closed, error or (None if data else write_error)


async def _keep_alive(
    inp: HostileInput, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> tuple[bytes, bool, str | None, int]:
    """The requests one after another, each answer read before the next is written; also
    returns how many requests were written (fewer if the node closed the connection)."""
    data = b""
    for i, chunk in enumerate(inp.chunks):
        writer.write(chunk)
        try:
            await asyncio.wait_for(writer.drain(), inp.read_timeout_s)
        except (ConnectionError, TimeoutError) as exc:
            return data, False, type(exc).__name__, i + 1
        more, closed, error = await _read(reader, inp.read_timeout_s, False, 1)
        data += more
        responses, _ = parse_responses(more)
        ended = closed or error is not None or (bool(responses) and responses[-1].close)
        if ended:
            last = i == len(inp.chunks) - 1
            return data, closed, error or (None if last else "closed early"), i + 1
    return data, False, None, len(inp.chunks)


class Sources:
    """Loopback source addresses for the attacker: 127.0.0.2 and up (honest nodes connect
    from 127.0.0.1), a new one for each input so the per-address caps are not what refuses
    it, except where a class asks for one address on purpose."""

    def __init__(self) -> None:
        self._next = 0

    def take(self) -> str:
        self._next += 1
        n = self._next % (250 * 250)
        return f"127.0.{n // 250 + 1}.{n % 250 + 2}"

    def block(self, count: int) -> list[str]:
        return [self.take() for _ in range(count)]


async def run_inputs(
    inputs: Sequence[HostileInput],
    ports: dict[str, int],
    sources: Sources,
    *,
    parallel: int = 8,
    per_address: int = 1,
    same_source: bool = False,
    deadline_s: float = 120.0,
) -> list[Answer]:
    """Throw `inputs`, `parallel` at a time (all at once when parallel = 0), each from its own
    source address (`per_address` inputs share one; all share one with `same_source`).
    Whatever is still running at `deadline_s` is cancelled and reported as a timeout."""
    if same_source:
        addresses = [sources.take()] * len(inputs)
    else:
        block = sources.block((len(inputs) + per_address - 1) // per_address)
        addresses = [block[i // per_address] for i in range(len(inputs))]
    limit = asyncio.Semaphore(parallel or max(1, len(inputs)))

    async def one_input(inp: HostileInput, source: str) -> Answer:
        async with limit:
            return await exchange(inp, ports[inp.target], source)

    tasks = [
        asyncio.create_task(one_input(inp, src)) for inp, src in zip(inputs, addresses, strict=True)
    ]
    done, pending = await asyncio.wait(tasks, timeout=deadline_s)
    for task in pending:
        task.cancel()
    answers = []
    for inp, task in zip(inputs, tasks, strict=True):
        if task in done and task.exception() is None:
            answers.append(task.result())
        else:
            answers.append(Answer(inp.kind, inp.target, error="deadline", sent=0))
    return answers


# ---------------------------------------------------------------------------- capture proxy


@dataclass
class Captured:
    envelope: bytes
    round: int
    status: int
    auth: str  # the request's Murmur-Auth header, as relayed


class CaptureProxy:
    """A transparent relay on one link, sender -> receiver: the sender's config names this
    proxy as the receiver's address; every envelope is passed on unchanged and a copy of the
    first `keep` accepted ones is kept. This is how an eavesdropper on the path (a hospital's
    proxy, a tapped link) obtains valid envelopes to replay; training sees no difference."""

    def __init__(self, upstream: str, keep: int = 32) -> None:
        # The request signature is relayed unchanged, as any transparent relay would.
        self.upstream = upstream.rstrip("/")
        self.keep = keep
        self.captured: list[Captured] = []
        self.relayed = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.address = ""

    async def start(self, avoid: Iterable[int] = ()) -> str:
        """Listen on a free port that is none of `avoid`: the network's ports were free when
        run_cluster chose them and are released until the nodes bind them, so the OS may
        hand one of them out again."""
        app = web.Application(client_max_size=64 * MiB)
        app.router.add_post("/gossip", self._gossip)
        app.router.add_get("/health", self._health)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=20), auto_decompress=False
        )
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        avoid = set(avoid)
        for _ in range(20):
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            port = self._runner.addresses[-1][1]
            if port not in avoid:
                self.address = f"http://127.0.0.1:{port}"
                return self.address
            await site.stop()
        raise RuntimeError("no free port for the capture proxy")

    async def _gossip(self, request: web.Request) -> web.Response:
        body = await request.read()
        assert self._session is not None
        auth = request.headers.get(AUTH_HEADER, "")
        async with self._session.post(
            self.upstream + "/gossip",
            data=body,
            headers={"Content-Type": "application/x-murmur-envelope", AUTH_HEADER: auth},
        ) as reply:
            answer = await reply.read()
            status = reply.status
        self.relayed += 1
        if status == 202 and len(self.captured) < self.keep:
            self.captured.append(Captured(body, peek_envelope(body).round, status, auth))
        return web.Response(status=status, body=answer, content_type="application/json")

    async def _health(self, request: web.Request) -> web.Response:
        assert self._session is not None
        try:
            async with self._session.get(self.upstream + "/health") as reply:
                return web.Response(status=reply.status, body=await reply.read())
        except (aiohttp.ClientError, TimeoutError, OSError):
            return web.Response(status=502)  # the receiver is not up yet

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()


# ---------------------------------------------------------------------------- the network


def rss_mb(pid: int) -> float:
    """Resident set size (VmRSS) of a process, MiB; 0 when it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else 0.0


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuSample:
    """A process's CPU time so far, two ways. `ns`: the scheduler's run time of each live
    thread (/proc/PID/task/*/schedstat), to the nanosecond, user and kernel together. `user_s`
    and `system_s`: /proc/PID/stat, every thread that ever ran, in 10 ms clock ticks. `tasks`:
    the live threads (one that exits between two samples takes its schedstat with it)."""

    ns: int
    user_s: float
    system_s: float
    tasks: frozenset[int]

    def __sub__(self, earlier: CpuSample) -> CpuSample:
        """The CPU between two samples; its `tasks` are the threads of `earlier` that
        exited meanwhile (then `ns` misses their time)."""
        return CpuSample(
            self.ns - earlier.ns,
            self.user_s - earlier.user_s,
            self.system_s - earlier.system_s,
            earlier.tasks - self.tasks,
        )


def cpu_sample(pid: int) -> CpuSample:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    ns, tasks = 0, set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            ns += int((task / "schedstat").read_text().split()[0])
            tasks.add(int(task.name))
    return CpuSample(
        ns, int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS, frozenset(tasks)
    )


def audit_rows_from(state_dir: Path, sender: str) -> int:
    """`message_received` records of one sender in a node's audit log: an authenticated
    member's refused requests are audited one record each, a stranger's never."""
    try:
        return sum(
            1
            for r in records_of_kind(state_dir, "message_received")
            if r.fields.get("sender") == sender
        )
    except Exception:  # the file may not exist yet
        return 0


def audit_rows(state_dir: Path) -> dict[str, int]:
    """Records per kind in a node's audit.sqlite (read-only, from outside the node)."""
    try:
        return counts_by_kind(state_dir)
    except Exception:  # the file may not exist yet
        return {}


@dataclass
class NetworkSettings:
    """One hostile-test network: run_cluster's defaults but no DP (so two runs with one seed
    learn exactly the same thing), the mean (no robust rule hides a bad input), and timeouts
    sized so that slow senders are cut quickly.

    Its last `offline` hospitals are in every config but never started. Each round then
    lasts its whole deadline (`round_timeout_s`) while the others wait for the offline one,
    at almost no CPU: a training network that stays in its rounds for as long as an attack
    takes, on a 2-core machine, without minutes of local epochs. A missing neighbour's
    weight stays with the node, so the runs stay deterministic; `startup_timeout_s` only has
    to cover the real nodes' start.

    The second node accepts 17 MiB envelopes, for the 16 MB unauthenticated-request
    measurement; the others have a limit of 1 MiB (this model's default would be 72 KB; what
    matters is that there is one)."""

    nodes: int = 4
    offline: int = 1
    rounds: int = 6
    local_epochs: int = 5
    seed: int = 0
    body_timeout_s: float = 2.0
    idle_timeout_s: float = 15.0
    round_timeout_s: float = 3.0
    startup_timeout_s: float = 10.0
    limit_bytes: int = MiB
    big_limit_bytes: int = 17 * MiB
    capture: bool = True  # relay hospital_0 -> hospital_1 through a CaptureProxy

    def cluster_args(self) -> list[str]:
        return [
            "--nodes", str(self.nodes),
            "--rounds", str(self.rounds),
            "--local-epochs", str(self.local_epochs),
            "--seed", str(self.seed),
            "--no-dp",
            "--aggregator", "mean",
            "--round-timeout", str(self.round_timeout_s),
        ]  # fmt: skip


class HostileNetwork:
    """A network of real node processes, started with `--serve` so they stay up (and idle)
    after their rounds, for the measurements that need a quiet node; `stop` ends them."""

    def __init__(self, run_dir: Path, settings: NetworkSettings, fake: int | None = None) -> None:
        self.settings = settings
        self.net: Network = make_network(run_dir, *settings.cluster_args())
        everyone = [n.name for n in self.net.nodes]
        # The last `fake` members (default: the offline ones) are in every config but get
        # no process: nobody, or someone else, answers at their addresses.
        fake = settings.offline if fake is None else fake
        self.names = everyone[: len(everyone) - fake]
        self.fake = everyone[len(everyone) - fake :]
        self.proxy: CaptureProxy | None = None
        self.limits: dict[str, int] = {}
        self.big = self.names[1 % len(self.names)]
        self._session: aiohttp.ClientSession | None = None
        self.exit_codes: dict[str, int | None] = {}

    @property
    def ports(self) -> dict[str, int]:
        return {n.name: int(n.address.rsplit(":", 1)[1]) for n in self.net.nodes}

    def address(self, name: str) -> str:
        return self.net.node(name).address

    def pid(self, name: str) -> int:
        return self.net.procs[name].pid

    def members(self) -> dict[str, Identity]:
        return {
            n.name: load_identity(self.net.run_dir / "keys" / f"{n.name}.key")
            for n in self.net.nodes
        }

    async def start(self) -> None:
        s = self.settings
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        for name in self.names:
            # The insider (the offline member) sends hundreds of requests: a per-peer allowance
            # this network's attack does not exhaust, so that what refuses each input is the
            # check the input is about (the allowance itself: tests/test_http.py).
            self.net.edit_config(
                name,
                "peer_listener",
                body_timeout_s=s.body_timeout_s,
                idle_timeout_s=s.idle_timeout_s,
                peer_burst=1e6,
                peer_max_bodies=64,
            )
            limit = s.big_limit_bytes if name == self.big else s.limit_bytes
            self.net.edit_config(
                name, "gossip", max_message_bytes=limit, startup_timeout_s=s.startup_timeout_s
            )
            self.limits[name] = limit
        if s.capture:
            sender, receiver = self.names[0], self.names[1]
            self.proxy = CaptureProxy(self.net.node(receiver).address)
            taken = [
                int(a.rsplit(":", 1)[1])
                for n in self.net.nodes
                for a in (n.address, n.operator_address)
            ]
            self._set_peer_address(sender, receiver, await self.proxy.start(avoid=taken))
        # The nodes stop by themselves if this process dies (node.lifecycle._watch_parent).
        with mock.patch.dict(os.environ, {"MURMUR_PARENT_PID": str(os.getpid())}):
            for name in self.names:
                self.net.start(name, "--serve")
        await self.wait(lambda st: all(s.get("round", 0) >= 1 for s in st.values()), 120, "round 1")

    def _set_peer_address(self, node: str, peer: str, address: str) -> None:
        path = self.net.node(node).config_path
        doc = tomllib.loads(path.read_text())
        for entry in doc["peers"]:
            if entry["name"] == peer:
                entry["address"] = address
        path.write_text(run_cluster.to_toml(doc))

    async def status(self, name: str) -> dict[str, Any]:
        assert self._session is not None
        async with self._session.get(f"{self.net.node(name).operator_address}/status") as r:
            return await r.json()

    async def statuses(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name in self.names:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                out[name] = await self.status(name)
        return out

    async def wait(
        self, done: Callable[[dict[str, dict[str, Any]]], bool], timeout_s: float, what: str
    ) -> dict[str, dict[str, Any]]:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            self.check_alive()
            st = await self.statuses()
            if len(st) == len(self.names) and done(st):
                return st
            await asyncio.sleep(0.25)
        raise TimeoutError(f"network did not reach {what} in {timeout_s}s; logs:\n" + self.logs())

    async def wait_done(self, timeout_s: float) -> dict[str, dict[str, Any]]:
        rounds = self.settings.rounds
        return await self.wait(
            lambda st: all(s["round"] >= rounds and s["phase"] == "done" for s in st.values()),
            timeout_s,
            f"round {rounds} done",
        )

    def alive(self) -> dict[str, bool]:
        return {name: self.net.procs[name].poll() is None for name in self.names}

    def check_alive(self) -> None:
        dead = [name for name, up in self.alive().items() if not up]
        if dead:
            raise RuntimeError(f"node processes exited: {dead}; logs:\n" + self.logs(dead))

    async def healthy(self) -> dict[str, bool]:
        """Whether each node's process runs and its peer listener answers /health."""
        out = {}
        assert self._session is not None
        for node in (self.net.node(name) for name in self.names):
            ok = self.net.procs[node.name].poll() is None
            if ok:
                try:
                    async with self._session.get(
                        f"{node.address}/health", timeout=aiohttp.ClientTimeout(total=5)
                    ) as r:
                        ok = r.status == 200
                except (aiohttp.ClientError, TimeoutError, OSError):
                    ok = False
            out[node.name] = ok
        return out

    def logs(self, names: Iterable[str] | None = None) -> str:
        return "\n".join(f"--- {n}\n{self.net.log(n)}" for n in (names or self.names))

    def rss(self) -> dict[str, float]:
        return {name: rss_mb(self.pid(name)) for name in self.names}

    def audit(self) -> dict[str, dict[str, int]]:
        return {name: audit_rows(self.net.node(name).state_dir) for name in self.names}

    async def stop(self, grace_s: float = 15.0) -> dict[str, int | None]:
        """SIGTERM every node (they write their last audit records), SIGKILL the laggards."""
        for proc in self.net.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + grace_s
        while any(p.poll() is None for p in self.net.procs.values()) and time.monotonic() < end:
            await asyncio.sleep(0.1)
        self.exit_codes = {name: p.poll() for name, p in self.net.procs.items()}
        self.net.kill_all()
        if self.proxy is not None:
            await self.proxy.close()
        if self._session is not None:
            await self._session.close()
        return self.exit_codes


# ---------------------------------------------------------------------------- the attack


@dataclass
class ClassResult:
    """One input class: what was sent and what came back."""

    kind: str
    sent: int = 0  # inputs (connections; a keep-alive connection counts its requests)
    statuses: Counter[int] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    untyped: int = 0  # answers >= 400 without a known reason code
    http_5xx: int = 0  # 5xx answers other than the documented 503 too_many_connections
    busy_503: int = 0
    accepted: int = 0  # junk that was accepted (202): a finding
    unanswered: int = 0  # connections that ended without an answer and with nothing silent
    crashes: int = 0  # nodes that died or stopped answering /health during this class
    seconds: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)
    continued: int = 0  # bodies invited with 100 Continue
    closed_unasked: int = 0  # connections the node closed without an answer (no request)
    longest_s: float = 0.0  # the longest connection
    first_round: int | None = None  # the lowest round a node was in when this class began
    last_round: int | None = None  # the highest round a node was in when it ended
    after_training: bool = False  # every node had finished its rounds when it began

    def note_rounds(self, at_start: list[int], at_end: list[int], training: bool) -> None:
        low, high = min(at_start, default=0), max(at_end, default=0)
        if self.first_round is None:  # the class's first batch: did it begin while training?
            self.after_training = not training
        self.first_round = low if self.first_round is None else min(self.first_round, low)
        self.last_round = high if self.last_round is None else max(self.last_round, high)

    def surprises(self) -> dict[str, int]:
        """Reasons this class got that `EXPECTED` does not list for it."""
        allowed = EXPECTED.get(self.kind, frozenset())
        if allowed == ANY:
            return {}
        return {r: n for r, n in self.reasons.items() if r not in allowed}

    @property
    def rounds(self) -> str:
        """When it ran: 'R1-R2' (rounds nodes were in), or 'after' the rounds were done."""
        if self.first_round is None:
            return "-"
        return "after" if self.after_training else f"{self.first_round}-{self.last_round}"

    def add(self, answer: Answer) -> None:
        self.sent += answer.sent
        for status, reason in answer.responses:
            self.statuses[status] += 1
            if status >= 400 and reason not in KNOWN_REASONS:
                self.untyped += 1
            if reason is not None:
                self.reasons[reason] += 1
            if status >= 500 and (status, reason) != BUSY:
                self.http_5xx += 1
            if (status, reason) == BUSY:
                self.busy_503 += 1
            if status == 202:
                self.accepted += 1
        self.reasons.update(f"{r} (silent)" for r in answer.silent)
        if not answer.responses and not answer.silent:
            self.unanswered += 1
            self.closed_unasked += answer.closed_by_node
        self.longest_s = max(self.longest_s, answer.seconds)
        if answer.error:
            self.errors[answer.error] += 1
        self.continued += answer.got_continue


@dataclass
class AttackResult:
    classes: dict[str, ClassResult]
    answers: list[Answer]
    expected: dict[str, Counter[str]]  # node -> refusals it must have counted
    counted: dict[str, Counter[str]]  # node -> what its /status says it counted
    rss_before: dict[str, float]
    rss_after: dict[str, float]
    audit_before: dict[str, dict[str, int]]
    seconds: float

    @property
    def inputs(self) -> int:
        return sum(c.sent for c in self.classes.values())

    def mismatches(self) -> dict[str, dict[str, int]]:
        """node -> reason -> counted minus expected, where they differ."""
        out = {}
        for node, counted in self.counted.items():
            expected = self.expected.get(node, Counter())
            diff = {
                reason: counted.get(reason, 0) - expected.get(reason, 0)
                for reason in set(counted) | set(expected)
                if counted.get(reason, 0) != expected.get(reason, 0)
            }
            if diff:
                out[node] = diff
        return out

    @property
    def untyped_counted(self) -> list[str]:
        return sorted({r for c in self.counted.values() for r in c if r not in KNOWN_REASONS})

    @property
    def rss_growth_mb(self) -> float:
        return max(self.rss_after[n] - self.rss_before[n] for n in self.rss_before)


def _counted_delta(before: dict[str, Any], after: dict[str, Any]) -> Counter[str]:
    delta = Counter(after.get("rejected", {}))
    delta.subtract(before.get("rejected", {}))
    return Counter({k: v for k, v in delta.items() if v})


# How each class is thrown: parallel connections (0: all at once), inputs per source address,
# one source address for all, and a deadline for the whole class.
@dataclass(frozen=True)
class Pace:
    parallel: int = 8
    per_address: int = 1
    same_source: bool = False
    deadline_s: float = 120.0


PACE: dict[str, Pace] = {
    "concurrent": Pace(parallel=0, per_address=10, deadline_s=60),
    "upload_cap": Pace(parallel=0, same_source=True, deadline_s=60),
    "trickle": Pace(parallel=0),
    "trickle_headers": Pace(parallel=0, deadline_s=60),
    "length_long": Pace(parallel=0),
    "oversize": Pace(parallel=4),
    "unauth_16mb": Pace(parallel=2),
}


async def attack(
    net: HostileNetwork,
    counts: dict[str, int],
    *,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> AttackResult:
    """Throw `counts[kind]` inputs of each class at the network while it trains.

    Classes run one after another, so that a crash is attributed to the class that caused
    it; the bulk random junk is cut into slices thrown between them, so that it spans the
    whole attack (and as many rounds as possible). Slowloris connections run in the
    background from the start, since each takes the node's idle timeout to be cut.
    """
    rng = np.random.default_rng(seed)
    sources = Sources()
    started = time.monotonic()
    ctx = InputContext(
        targets=list(net.names),
        limits=dict(net.limits),
        body_timeout_s=net.settings.body_timeout_s,
        members=net.members(),
    )
    if net.proxy is not None:
        ctx.capture_author, ctx.capture_target = net.names[0], net.names[1]
    ctx.insider = net.fake[0] if net.fake else net.names[-1]
    before = await net.statuses()
    rss_before = net.rss()
    audit_before = net.audit()
    classes: dict[str, ClassResult] = {}
    answers: list[Answer] = []

    idle_timeout_s = net.settings.idle_timeout_s
    slow_inputs = gen_trickle_headers(rng, counts.get("trickle_headers", 0), ctx, idle_timeout_s)
    slow = asyncio.create_task(
        run_inputs(slow_inputs, net.ports, sources, parallel=0, deadline_s=idle_timeout_s + 30)
    )
    plan = [k for k, n in counts.items() if n > 0 and k not in ("trickle_headers", "random_bytes")]
    bulk = counts.get("random_bytes", 0)
    slices = [
        bulk // (len(plan) + 1) + (1 if i < bulk % (len(plan) + 1) else 0)
        for i in range(len(plan) + 1)
    ]
    steps: list[tuple[str, int]] = []
    for i, kind in enumerate(plan):
        steps += [("random_bytes", slices[i]), (kind, counts[kind])]
    steps.append(("random_bytes", slices[-1]))

    for kind, n in steps:
        if n <= 0:
            continue
        generator, needs_capture = GENERATORS[kind]
        if needs_capture:
            await _wait_for_capture(net, ctx)
        inputs = generator(rng, n, ctx)
        pace = PACE.get(kind, Pace())
        rounds_at_start, training = await _rounds(net)
        t0 = time.monotonic()
        got = await run_inputs(
            inputs,
            net.ports,
            sources,
            parallel=pace.parallel,
            per_address=pace.per_address,
            same_source=pace.same_source,
            deadline_s=pace.deadline_s,
        )
        result = classes.setdefault(kind, ClassResult(kind))
        result.seconds += time.monotonic() - t0
        for answer in got:
            result.add(answer)
        result.crashes += sum(1 for ok in (await net.healthy()).values() if not ok)
        result.note_rounds(rounds_at_start, (await _rounds(net))[0], training)
        answers += got
        if progress:
            progress(f"{kind}: {len(got)} connections, {dict(result.reasons)}")

    got = await slow
    if slow_inputs:
        result = ClassResult("trickle_headers")
        for answer in got:
            result.add(answer)
        result.seconds = result.longest_s
        result.crashes = sum(1 for ok in (await net.healthy()).values() if not ok)
        classes["trickle_headers"] = result
        answers += got

    expected: dict[str, Counter[str]] = {name: Counter() for name in net.names}
    for answer in answers:
        expected[answer.target].update(answer.counted())
    # Counting happens on each node's own loop: give the last refusals a moment to land.
    counted: dict[str, Counter[str]] = {}
    for _ in range(20):
        after = await net.statuses()
        counted = {n: _counted_delta(before[n], after[n]) for n in net.names}
        if counted == expected:
            break
        await asyncio.sleep(0.25)
    return AttackResult(
        classes=classes,
        answers=answers,
        expected=expected,
        counted=counted,
        rss_before=rss_before,
        rss_after=net.rss(),
        audit_before=audit_before,
        seconds=time.monotonic() - started,
    )


async def _rounds(net: HostileNetwork) -> tuple[list[int], bool]:
    """The round each node is in, and whether any is still in its rounds."""
    statuses = (await net.statuses()).values()
    return [s.get("round", 0) for s in statuses], any(s.get("phase") != "done" for s in statuses)


async def _wait_for_capture(net: HostileNetwork, ctx: InputContext, timeout_s: float = 60) -> None:
    """Until the proxy has relayed an accepted envelope (the first round's comes early)."""
    assert net.proxy is not None, "classes that replay need the capture proxy"
    end = time.monotonic() + timeout_s
    while not net.proxy.captured and time.monotonic() < end:
        await asyncio.sleep(0.1)
    if not net.proxy.captured:
        raise TimeoutError("the capture proxy saw no accepted envelope")
    ctx.captured = [c.envelope for c in net.proxy.captured]
    ctx.captured_auth = [c.auth for c in net.proxy.captured]


# ---------------------------------------------------------------------------- the insider


def resigned_as(envelope: bytes, insider: Identity) -> bytes:
    """Another member's envelope with the insider named as its sender and signed by the
    insider; nonce, recipients, wrapped keys and ciphertext untouched. Before protocol v4
    nothing bound the body to its sender (issue #25 item 1), so a recipient decrypted it as
    the insider's update; since v4 the key wraps and the body are bound to the real sender,
    and it is refused as decrypt_failed."""
    return resign(envelope, signer=insider, sender=insider.public_key)


@dataclass
class Forwarded:
    round: int
    receiver: str
    status: int | None
    reason: str | None


class FreeRider:
    """An allowlisted member that trains nothing. It answers at its own address (so its
    neighbours see it up), takes every envelope they send it and forwards it, re-signed as
    its own (`resigned_as`), to the envelope's other recipients: a free-rider whose "update"
    is someone else's model. Every forward is recorded with the receiver's answer.

    Forwarding each neighbour's envelope to the others gives them different envelopes signed
    by the free-rider for one round, which the receipts they exchange prove (equivocation).
    With `consistent`, it forwards only the first envelope of each round, the same bytes to
    all of that envelope's recipients: no two of them hold different ones, and the author of
    that envelope gets nothing from the free-rider that round."""

    def __init__(
        self,
        identity: Identity,
        address: str,
        peers: dict[bytes, tuple[str, str]],
        consistent: bool = False,
    ):
        self.identity = identity
        self.consistent = consistent
        self._rounds_forwarded: set[int] = set()
        self.host, port = address.removeprefix("http://").rsplit(":", 1)
        self.port = int(port)
        self.peers = peers  # public key -> (name, peer listener address)
        self.forwarded: list[Forwarded] = []
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * MiB)
        app.router.add_post("/gossip", self._gossip)
        app.router.add_get("/health", self._health)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def _gossip(self, request: web.Request) -> web.Response:
        body = await request.read()
        task = asyncio.create_task(self._forward(body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return web.json_response({"reason": "accepted"}, status=202)

    async def _forward(self, envelope: bytes) -> None:
        assert self._session is not None
        info = peek_envelope(envelope)
        if self.consistent and info.round in self._rounds_forwarded:
            return
        self._rounds_forwarded.add(info.round)
        forged = resigned_as(envelope, self.identity)
        for key in info.recipients:
            if key == self.identity.public_key or key not in self.peers:
                continue
            name, address = self.peers[key]
            status, reason = None, None
            headers = request_headers(
                self.identity, key, "/gossip", forged, "application/x-murmur-envelope"
            )
            try:
                async with self._session.post(
                    address + "/gossip", data=forged, headers=headers
                ) as reply:
                    status = reply.status
                    with contextlib.suppress(ValueError, aiohttp.ContentTypeError):
                        reason = (await reply.json()).get("reason")
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                reason = type(exc).__name__
            self.forwarded.append(Forwarded(info.round, name, status, reason))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()


@dataclass
class InsiderResult:
    forwarded: list[Forwarded]
    rounds_done: dict[str, int]
    proven: dict[str, dict[str, int]]  # node -> peer -> round its equivocation was proven
    missing: dict[str, int]  # node -> neighbour updates that missed a round's deadline

    @property
    def accepted(self) -> int:
        return sum(1 for f in self.forwarded if f.status == 202)


async def insider_run(
    run_dir: Path,
    *,
    nodes: int = 3,
    consistent: bool = False,
    rounds: int = 3,
    local_epochs: int = 5,
) -> InsiderResult:
    """A network whose last member is a FreeRider and the others real node processes. The
    deadline per round is short (3 s), so a refused or withheld update only costs time."""
    settings = NetworkSettings(
        nodes=nodes,
        offline=0,
        rounds=rounds,
        local_epochs=local_epochs,
        round_timeout_s=3.0,
        capture=False,
    )
    net = HostileNetwork(run_dir, settings, fake=1)
    insider = net.fake[0]
    members = net.members()
    rider = FreeRider(
        members[insider],
        net.address(insider),
        {members[n].public_key: (n, net.address(n)) for n in net.names},
        consistent=consistent,
    )
    await rider.start()
    try:
        await net.start()
        done = await net.wait_done(60 + rounds * 10)
    finally:
        await net.stop()
        await rider.close()
    return InsiderResult(
        forwarded=list(rider.forwarded),
        rounds_done={n: len(s.get("history", [])) for n, s in done.items()},
        proven={n: s.get("equivocation", {}).get("proven", {}) for n, s in done.items()},
        missing={n: sum(len(h["missing"]) for h in s["history"]) for n, s in done.items()},
    )


# ---------------------------------------------------------------------------- measurements


@dataclass(frozen=True)
class CpuCost:
    """What a quiet node process spent per request (ms): `ms`, user and kernel time of all
    its threads less its idle CPU over the same wall time; `user_ms` and `system_ms`, the
    same split from /proc/PID/stat (clock ticks, idle not subtracted); `idle_ms_per_s`;
    `precise`: whether `ms` is the scheduler's nanosecond count (False: a thread exited
    meanwhile, so it is the clock-tick total, to 20 ms / `requests`)."""

    ms: float
    user_ms: float
    system_ms: float
    idle_ms_per_s: float
    requests: int
    precise: bool


async def unauth_cpu_ms(
    net: HostileNetwork, requests: int, *, idle_s: float = 2.0
) -> tuple[CpuCost, ClassResult]:
    """CPU a quiet node spends to refuse one 16 MB envelope that names an allowlisted sender
    but is not signed by it (`CpuCost`): the node process's CPU time over `requests` such
    requests, each on a new connection without `Expect`, minus its idle CPU (measured for
    `idle_s` before and after) over the same wall time, divided by `requests`.

    The node must be idle (its rounds done): run this after `wait_done`."""
    ctx = InputContext(
        targets=list(net.names),
        limits=dict(net.limits),
        body_timeout_s=net.settings.body_timeout_s,
        members=net.members(),
    )
    target = net.big
    envelope = unauth_16mb_envelope(ctx, target)
    data = gossip_post(envelope)
    pid = net.pid(target)
    sources = Sources()
    inp = HostileInput("unauth_16mb", target, (data,))
    result = ClassResult("unauth_16mb")

    async def idle() -> tuple[CpuSample, float]:
        start, t0 = cpu_sample(pid), time.monotonic()
        await asyncio.sleep(idle_s)
        return cpu_sample(pid) - start, time.monotonic() - t0

    idle_before, idle_wall = await idle()
    start, t0 = cpu_sample(pid), time.monotonic()
    for _ in range(requests):
        result.add(await exchange(inp, net.ports[target], sources.take()))
    busy, wall = cpu_sample(pid) - start, time.monotonic() - t0
    idle_after, idle_wall_after = await idle()
    precise = not (busy.tasks or idle_before.tasks or idle_after.tasks)  # no thread exited
    if precise:
        idle_rate = (idle_before.ns + idle_after.ns) / 1e9 / (idle_wall + idle_wall_after)
        spent = busy.ns / 1e9
    else:
        total = lambda c: c.user_s + c.system_s  # noqa: E731
        idle_rate = (total(idle_before) + total(idle_after)) / (idle_wall + idle_wall_after)
        spent = total(busy)
    result.seconds = wall
    cost = CpuCost(
        ms=max(0.0, spent - idle_rate * wall) / requests * 1000,
        user_ms=busy.user_s / requests * 1000,
        system_ms=busy.system_s / requests * 1000,
        idle_ms_per_s=idle_rate * 1000,
        requests=requests,
        precise=precise,
    )
    return cost, result
