"""Membership on a running node: the `/governance` exchange with peers, the operator's
`POST /governance`, and applying a new membership to the node's parts.

The exchange: every message, request or answer, is one msgpack map
``{"epoch": E, "records": [proposal or vote encodings], "changes": [applied changes]}``.
A node posts its epoch and its pending records to every peer at start, whenever it took a
new record, and every `[consortium] exchange_interval_s`; the peer takes the records, and
answers with the applied changes after E (a node that was down, or a newly admitted one,
catches up from them) and its own pending records. The peer route is authenticated like
every other (gossip/auth.py: `Murmur-Auth` before the body), so only current members take
part; records are signed on their own, so a record relayed by any member is as good as
one from its signer.

Applying: the allowlist (crypto/allowlist.py) is replaced in place, so every part holding
it (request authentication, the envelope opener, evidence, rollback) sees the change for
the next request; the peer list, the liveness and trust books, the status' peers, the
round loop's names and catch-up quorum, and the mixing degrees follow. A revoked key is
refused from the next request on (`unauthenticated` / `revoked_key`).

The exchange goes directly or through the peer's relays (live, not stored: a member that
is away gets the next exchange). Not supported: the topology of a consortium network is the
complete graph of its members.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import msgpack
from aiohttp import web
from murmur.crypto.allowlist import Peer
from murmur.gossip.liveness import PeerHealth
from murmur.gossip.membership import Membership, MembershipError, Reason
from murmur.gossip.transport import GOVERNANCE_CONTENT_TYPE
from murmur.gossip.trust import PeerTrust
from murmur.node.consortium import Offered
from murmur.node.neighbours import first_of

if TYPE_CHECKING:
    from murmur.node.node import HospitalNode

log = logging.getLogger("murmur.governance")

GOVERNANCE_PATH = "/governance"

MAX_GOVERNANCE_BYTES = 1024 * 1024
MAX_RECORDS_PER_MESSAGE = 256


def encode_exchange(epoch: int, records: list[bytes], changes: list[bytes]) -> bytes:
    return msgpack.packb(
        {"epoch": epoch, "records": records[:MAX_RECORDS_PER_MESSAGE], "changes": changes},
        use_bin_type=True,
    )


def decode_exchange(body: bytes) -> tuple[int, list[bytes], list[bytes]]:
    """(epoch, records, changes); ``MembershipError(MALFORMED)`` for anything else."""
    try:
        obj = msgpack.unpackb(body, raw=False, max_bin_len=MAX_GOVERNANCE_BYTES)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        raise MembershipError(Reason.MALFORMED, "the governance message is not msgpack") from None
    if not isinstance(obj, dict):
        raise MembershipError(Reason.MALFORMED, "the governance message is not a map")
    epoch, records, changes = obj.get("epoch"), obj.get("records"), obj.get("changes")
    if type(epoch) is not int or not isinstance(records, list) or not isinstance(changes, list):
        raise MembershipError(Reason.MALFORMED, "epoch, records and changes are required")
    if len(records) > MAX_RECORDS_PER_MESSAGE or len(changes) > MAX_RECORDS_PER_MESSAGE:
        raise MembershipError(Reason.MALFORMED, "too many records in one message")
    if not all(isinstance(x, bytes) for x in [*records, *changes]):
        raise MembershipError(Reason.MALFORMED, "records and changes are bin objects")
    return epoch, records, changes


def take(node: HospitalNode, records: list[bytes], changes: list[bytes], source: str) -> bool:
    """Offer changes (in order) and records to the node's governance; refusals are counted
    and audited, applied memberships applied. True when anything was new."""
    gov = node.governance
    assert gov is not None
    new = False
    for data in changes:
        new |= _handle(node, gov.offer_change(data), source)
    now = time.time()
    for data in records:
        new |= _handle(node, gov.offer(data, now), source)
    return new


def _handle(node: HospitalNode, offered: Offered, source: str) -> bool:
    if offered.reason is not None:
        node.record_rejection(
            f"governance_{offered.reason}",
            offered.detail,
            sender=source,
            round_=node.current_round,
        )
        return False
    for membership in offered.applied:
        # Once, to every runtime sharing the governance (each study of the process), with
        # no await between them: no study serves a request under the old membership after
        # another took the new one.
        for runtime in node.governed:
            apply_membership(runtime, membership, announce=runtime is node.governed[0])
    if offered.new:
        node.governance_news.set()
        for runtime in node.governed:
            runtime.state.consortium = runtime.governance.status() if runtime.governance else {}
    return offered.new


def answer(node: HospitalNode, body: bytes, source: str) -> tuple[int, bytes]:
    """One governance message from a peer (or the operator): (HTTP status, answer)."""
    gov = node.governance
    if gov is None:
        return 404, encode_exchange(0, [], [])
    try:
        epoch, records, changes = decode_exchange(body)
    except MembershipError as exc:
        node.record_rejection(
            f"governance_{exc.reason}", exc.detail, sender=source, round_=node.current_round
        )
        return 400, encode_exchange(gov.epoch, [], [])
    take(node, records, changes, source)
    return 200, encode_exchange(gov.epoch, gov.pending_records(), gov.changes_since(epoch))


async def governance_route(request: web.Request) -> web.Response:
    """`POST /governance` on the peer listener (node.api.add_peer_route: authenticated,
    size-capped)."""
    from murmur.node.api import NODE_KEY, authenticated_peer, read_peer_body

    body = await read_peer_body(request)
    if isinstance(body, web.Response):
        return body
    status, payload = answer(request.app[NODE_KEY], body, authenticated_peer(request).name)
    return web.Response(body=payload, status=status, content_type=GOVERNANCE_CONTENT_TYPE)


async def operator_governance(request: web.Request) -> web.Response:
    """`POST /governance` on the operator listener: one signed proposal or vote, as
    `murmur consortium propose|vote --node` hands it over (behind the operator guard; the
    record's own signature is what counts, so a forged one is refused like a peer's)."""
    from murmur.node.api import NODE_KEY

    node = request.app[NODE_KEY]
    gov = node.governance
    if gov is None:
        return web.json_response({"reason": "no_consortium"}, status=404)
    body = await request.content.read(MAX_GOVERNANCE_BYTES + 1)
    offered = gov.offer(body, time.time())
    _handle(node, offered, "operator")
    if offered.reason is not None:
        return web.json_response(
            {"reason": str(offered.reason), "detail": offered.detail}, status=422
        )
    return web.json_response(
        {
            "reason": "accepted" if offered.new else "duplicate",
            "epoch": gov.epoch,
            "applied": bool(offered.applied),
        },
        status=202,
    )


async def exchange_governance(node: HospitalNode, transport: Any, stop: asyncio.Event) -> None:
    """Until ``stop``: post epoch and pending records to every peer at start, on news and
    every interval, and take what they answer."""
    gov = node.governance
    assert gov is not None
    interval = node.config.consortium.exchange_interval_s
    while not stop.is_set():
        node.governance_news.clear()
        body = encode_exchange(gov.epoch, gov.pending_records(), [])
        async with asyncio.TaskGroup() as group:
            tasks = {
                p.name: group.create_task(transport.post_governance(p, body, MAX_GOVERNANCE_BYTES))
                for p in list(node.peers)
            }
        for name, task in tasks.items():
            status, reply = task.result()
            if status != 200:
                continue
            try:
                _, records, changes = decode_exchange(reply)
            except MembershipError as exc:
                node.record_rejection(
                    f"governance_{exc.reason}", exc.detail, sender=name, round_=None
                )
                continue
            take(node, records, changes, name)
        await first_of(stop, node.governance_news, timeout_s=interval)


# ------------------------------------------------------------------------------ applying


def peers_of(membership: Membership, node_name: str, own_key: bytes, config: Any) -> list[Peer]:
    """The node's peers under ``membership``: every member but itself, addressed as the
    membership says (relays from the config's entry of the same name when it has none)."""
    by_name = {p.name: p for p in config.peers}
    peers = []
    for m in membership.members:
        if m.public_key == own_key or m.name == node_name:
            continue
        relays = m.relays or tuple(by_name[m.name].relays if m.name in by_name else ())
        peers.append(Peer(m.name, m.address, m.public_key, tuple(relays)))
    return peers


def apply_membership(node: HospitalNode, membership: Membership, *, announce: bool = True) -> None:
    """Make ``membership`` the node's: peers, allowlist and every per-peer book, and its
    audit record; ``announce`` logs the change (once for the process, under [[studies]])."""
    peers = peers_of(membership, node.config.node.name, node.identity.public_key, node.config)
    before = {p.name for p in node.peers}
    after = {p.name for p in peers}
    node.peers[:] = peers
    node.allowlist.replace(peers, revoked=membership.revoked)
    node.evidence.receipts.known_senders = frozenset(p.public_key for p in peers)
    node.gate.set_members(peers)  # whose approvals and budget log heads count
    liveness = node.neighbours.liveness
    for name in after - before:
        node.trust.peers.setdefault(name, PeerTrust())
        liveness.peers[name] = PeerHealth()
        node.state.peers[name] = {"address": "", "last_round": 0, "last_seen": None}
    for name in before - after:
        liveness.peers.pop(name, None)
        node.state.peers.pop(name, None)
    for p in peers:
        node.state.peers[p.name]["address"] = p.address
    degree = len(peers)  # the complete graph of the members
    node.aggregator.set_degrees({p.name: degree for p in peers})
    node.rounds.set_peer_names([p.name for p in peers])
    if node.governance is not None:
        # the round of the first runtime it applied to (the first study's, under [[studies]])
        node.governance.applied_round.setdefault(membership.epoch, node.current_round)
        node.state.consortium = node.governance.status()
    me = membership.by_key(node.identity.public_key)
    node.audit.append(
        "membership",
        node.current_round,
        epoch=membership.epoch,
        head=membership.head.hex(),
        members=[m.name for m in membership.members],
        admitted=sorted(after - before),
        removed=sorted(before - after),
        revoked=len(membership.revoked),
        quorum=membership.quorum,
    )
    if announce:
        log.warning(
            "membership epoch %d: members %s (quorum %d)%s%s",
            membership.epoch,
            ", ".join(m.name for m in membership.members),
            membership.quorum,
            f"; admitted {', '.join(sorted(after - before))}" if after - before else "",
            f"; removed {', '.join(sorted(before - after))}" if before - after else "",
        )
    if announce and me is None and node.identity.public_key in membership.revoked:
        log.error("this node's key has been revoked by the consortium: peers refuse it now")
    node.neighbours.refresh_status()
    node.neighbours.news.set()
