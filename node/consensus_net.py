"""The consensus phase and the pooled evaluation between node processes, over
`POST /consensus` (gossip/consensus_wire.py), when `[consensus] enabled` and the planned
rounds are done.

Who takes part: the node and its peers, i.e. the consortium's current members
(node/governance.py) or, without a consortium, the node's allowlist. Both are the complete
graph of the members (a consortium's topology is; a static allowlist must list every other
member, or the nodes' member sets differ and they refuse each other's relayed offers as
`consensus_bad_signature`), so the phase takes t + 1 agreement steps and one signature step
(`gossip.consensus.steps_needed` of the complete graph).

Steps: at each step a node seals its message for every peer and posts it, then waits until
every peer's message for that step is in its `ConsensusInbox` or `step_timeout_s` passes (the
first step waits `start_timeout_s`, for members still training). A message arrives at most
one step early (a neighbour can be at most one step ahead: it needs ours to close a step) and
is kept for its step; one for a step already closed is refused (`consensus_late_step`), as is
a second one for a step (`consensus_duplicate`), one of another study, and anything that does
not decrypt or parse. Every refusal is counted and logged by `record_rejection`
(node/rejections.py) under its `consensus_*` code, and the phase goes on.

The signature step also carries every member's pooled-evaluation share (node/pooled.py: its
test-score histogram under the agreed model, masked with its pairwise masks, signed), for
the session of the agreed hash. With every member's share in, the sum is the pooled
histogram; if any is missing, the pooled evaluation is recorded as not computed, with who
was missing (dropout recovery, the survivors revealing their seeds, runs in
`pooled.pooled_in_memory` but is not carried over HTTP yet).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx
from aiohttp import web
from murmur.crypto.allowlist import Peer
from murmur.crypto.secure_sum import SecureSum
from murmur.gossip import consensus as cs
from murmur.gossip.consensus_attacks import ConsensusAttacker
from murmur.gossip.consensus_wire import (
    ConsensusMessage,
    ConsensusWireError,
    max_message_bytes,
    open_message,
    seal_message,
)
from murmur.models import pooled_eval as pe
from murmur.models.params import set_state
from murmur.models.training import predict_proba
from murmur.node import pooled
from murmur.node.consensus import FINAL_RULE, facts_of, study_label, write_agreement

if TYPE_CHECKING:
    from murmur.node.node import HospitalNode

log = logging.getLogger("murmur.consensus")

RETRY_S = 0.5  # how often an unreachable peer is tried again within a step
_OPEN_INLINE_BYTES = 256 * 1024  # bodies up to this are opened on the event loop


def share_bytes() -> int:
    return 8 * pe.vector_length(pe.BinSpec()) + 512


def route_limit(node: Any) -> int:
    """The largest `POST /consensus` body this node reads."""
    return max_message_bytes(node.study.spec, len(node.peers) + 1, share_bytes())


@dataclass
class ConsensusInbox:
    """Peers' messages, kept by step until the phase closes that step."""

    study: str
    step: int = 0  # the step being collected; 0 until the phase starts here
    last: int = 0  # the phase's last step, once known
    closed: bool = False
    slots: dict[int, dict[bytes, ConsensusMessage]] = field(default_factory=dict)
    news: asyncio.Event = field(default_factory=asyncio.Event)

    def take(self, sender: bytes, message: ConsensusMessage) -> str | None:
        """Keep ``message`` for its step; the reason code when it is refused."""
        if self.closed:
            return "consensus_closed"
        if message.study != self.study:
            return "consensus_wrong_study"
        if message.step < max(self.step, 1):
            return "consensus_late_step"
        if message.step > self.step + 1 or (self.last and message.step > self.last):
            return "consensus_step_out_of_range"
        slot = self.slots.setdefault(message.step, {})
        if sender in slot:
            return "consensus_duplicate"
        slot[sender] = message
        self.news.set()
        return None

    def arrived(self, step: int) -> dict[bytes, ConsensusMessage]:
        return self.slots.get(step, {})

    def close(self, step: int) -> dict[bytes, ConsensusMessage]:
        """The messages of ``step``; later ones for it are refused as late."""
        self.step = step + 1
        return self.slots.pop(step, {})


def inbox_for(config: Any) -> ConsensusInbox | None:
    """The node's inbox when `[consensus] enabled`. Open from the node's start: a member that
    finishes training first sends its first step while this node still trains."""
    return ConsensusInbox(study_label(config)) if config.consensus.enabled else None


async def answer(node: HospitalNode, body: bytes, sender: Peer) -> tuple[int, str]:
    """One `POST /consensus` body from an authenticated peer: (HTTP status, reason)."""
    inbox = node.consensus_inbox
    if inbox is None:
        return _refused(node, "consensus_not_enabled", "[consensus] enabled = false", sender, 409)
    args = (node.identity, sender.public_key, body, node.study.spec, route_limit(node))
    try:
        if len(body) <= _OPEN_INLINE_BYTES:
            message = open_message(*args)
        else:
            message = await asyncio.to_thread(open_message, *args)
    except ConsensusWireError as exc:
        return _refused(node, f"consensus_{exc.why}", str(exc), sender, 400)
    reason = inbox.take(sender.public_key, message)
    if reason is not None:
        return _refused(node, reason, f"step {message.step}", sender, 409)
    return 202, "accepted"


def _refused(node: Any, reason: str, detail: str, sender: Peer, status: int) -> tuple[int, str]:
    node.record_rejection(reason, detail, sender=sender.name, round_=None)
    return status, reason


async def consensus_route(request: web.Request) -> web.Response:
    """`POST /consensus`, added with node.api.add_peer_route (authenticated, size-capped)."""
    from murmur.node.api import NODE_KEY, authenticated_peer, read_peer_body

    body = await read_peer_body(request)
    if isinstance(body, web.Response):
        return body
    node = request.app[NODE_KEY]
    status, reason = await node.answer_consensus(body, authenticated_peer(request))
    return web.json_response({"reason": reason}, status=status)


# ------------------------------------------------------------------------------- the phase


@dataclass(frozen=True)
class Members:
    keys: frozenset[bytes]
    names: dict[bytes, str]
    peers: tuple[Peer, ...]


def members_of(node: Any) -> Members:
    """The node and its peers (the consortium's members, or the allowlist)."""
    peers = tuple(node.peers)
    names = {p.public_key: p.name for p in peers}
    names[node.identity.public_key] = node.config.node.name
    return Members(frozenset(names), names, peers)


def tolerated(node: Any, members: Members) -> int:
    """t: `[consensus] max_byzantine`, or aggregation.f; at most n - 2 (someone must be left
    to agree with)."""
    t = node.config.consensus.max_byzantine
    if t < 0:
        t = node.config.aggregation.f
    return max(0, min(t, len(members.keys) - 2))


async def _exchange(
    node: Any,
    transport: Any,
    members: Members,
    step: int,
    messages: Mapping[str, ConsensusMessage],
    timeout_s: float,
) -> dict[bytes, ConsensusMessage]:
    """Post each peer its message in ``messages`` (the same one for all, from an honest
    node), retrying unreachable ones, and collect theirs for ``step`` until all are in or
    ``timeout_s``; then close the step."""
    inbox: ConsensusInbox = node.consensus_inbox
    inbox.step = step
    node.state.consensus["step"] = step
    spec = node.study.spec
    by_name = {p.name: p for p in members.peers}
    # Sealing serializes whole models: off the event loop, which keeps serving peers.
    bodies = await asyncio.to_thread(
        lambda: {
            name: seal_message(node.identity, by_name[name].public_key, m, spec)
            for name, m in messages.items()
        }
    )
    pending = {name: by_name[name] for name in bodies}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not node.stop.is_set():
        if pending:
            async with asyncio.TaskGroup() as group:
                tasks = {
                    name: group.create_task(transport.post_consensus(p, bodies[name]))
                    for name, p in pending.items()
                }
            for name, task in tasks.items():
                status, reason = task.result()
                if status is not None:
                    pending.pop(name)
                    if status != 202:
                        log.warning("step %d: %s refused our message (%s)", step, name, reason)
        if len(inbox.arrived(step)) >= len(members.peers):
            break
        inbox.news.clear()
        wait = min(RETRY_S if pending else deadline - time.monotonic(), deadline - time.monotonic())
        try:
            async with asyncio.timeout(max(0.0, wait)):
                await inbox.news.wait()
        except TimeoutError:
            pass
    got = inbox.close(step)
    missing = sorted(members.names[k] for k in members.keys - set(got) - {node.identity.public_key})
    if missing:
        log.warning("step %d closed without a message from %s", step, ", ".join(missing))
    return got


def _agreed_scores(node: Any, agreed: Mapping[str, Any]) -> tuple[Any, Any]:
    """The agreed model's scores on this hospital's own test split (they stay here)."""
    model = copy.deepcopy(node.study.model)
    set_state(model, agreed)
    return node.data.y_test, predict_proba(model, node.data.x_test)


async def run_network_phase(node: HospitalNode, transport: Any) -> Path | None:
    """The whole phase with the other members; writes `<state_dir>/agreed/` (an adversary-mode
    node attacks instead, writes nothing and returns None)."""
    members = members_of(node)
    t = tolerated(node, members)
    steps, signature_steps = cs.steps_needed(nx.complete_graph(len(members.keys)), t)
    study = study_label(node.config)
    node.consensus_inbox.last = steps + signature_steps
    node.state.consensus = {"step": 0, "steps": steps + signature_steps, "agreed": None}
    attack = node.config.adversary.consensus_attack
    if attack:
        await _attack(node, transport, members, study, steps, attack)
        return None
    log.info(
        "consensus phase: %d members, t = %d, %d + %d steps",
        len(members.keys),
        t,
        steps,
        signature_steps,
    )
    decision = await _agree(node, transport, members, study, steps)
    flood, report = await _sign_and_pool(node, transport, members, study, decision, steps)
    node.consensus_inbox.closed = True
    out = write_agreement(
        node.state_dir,
        decision,
        flood,
        members.names,
        steps=steps + signature_steps,
        pooled=report,
        round_=node.state.round,
    )
    _record(node, members, decision, flood, steps + signature_steps)
    return out


async def _agree(
    node: Any, transport: Any, members: Members, study: str, steps: int
) -> cs.Decision:
    """The agreement steps: Dolev-Strong over the members, then the deterministic rule."""
    config = node.config.consensus
    party = cs.ConsensusParty(
        node.identity,
        members.keys,
        study,
        node.study.state(),
        steps,
        FINAL_RULE,
        node.config.aggregation.f,
        facts=facts_of(node),
    )
    for step in range(1, steps + 1):
        timeout = config.start_timeout_s if step == 1 else config.step_timeout_s
        message = ConsensusMessage(study, step, tuple(party.outgoing(step)))
        everyone = {p.name: message for p in members.peers}
        got = await _exchange(node, transport, members, step, everyone, timeout)
        for sender, m in sorted(got.items()):
            for reason in party.receive(step, m.offers):
                node.record_rejection(
                    reason, f"step {step}", sender=members.names[sender], round_=None
                )
    return party.decide()


async def _sign_and_pool(
    node: Any, transport: Any, members: Members, study: str, decision: cs.Decision, steps: int
) -> tuple[cs.SignatureFlood, dict[str, Any] | None]:
    """The signature step: every member's signature on the agreed hash and its pooled share
    (one step on the complete graph: every member sends its own to every other)."""
    config = node.config.consensus
    flood = cs.SignatureFlood(node.identity, members.keys, study, decision.model_sha256)
    evaluation = PooledRound(node, members, study, decision) if config.pooled_evaluation else None
    fresh = [evaluation.own_share] if evaluation else []
    for step in range(steps + 1, node.consensus_inbox.last + 1):
        message = ConsensusMessage(study, step, (), tuple(flood.outgoing()), tuple(fresh))
        everyone = {p.name: message for p in members.peers}
        got = await _exchange(node, transport, members, step, everyone, config.step_timeout_s)
        fresh = []
        for sender, m in sorted(got.items()):
            flood.receive(m.agreed)
            if evaluation is not None:
                fresh += evaluation.take(m.shares, members.names[sender])
    return flood, evaluation.report() if evaluation is not None else None


def _record(
    node: Any, members: Members, decision: cs.Decision, flood: cs.SignatureFlood, steps: int
) -> None:
    """The outcome in the audit log, /status and the log."""
    node.audit.append(
        "consensus",
        node.state.round,
        model_sha256=decision.model_sha256,
        included=[members.names[k] for k in decision.included],
        excluded={members.names.get(k, k.hex()): why for k, why in decision.excluded.items()},
        signers=sorted(members.names[k] for k in flood.signatures),
    )
    node.state.consensus = {
        "step": steps,
        "steps": steps,
        "agreed": decision.model_sha256,
        "signers": len(flood.signatures),
        "excluded": sorted(members.names.get(k, k.hex()) for k in decision.excluded),
    }
    node.write_status()
    log.warning(
        "agreed model %s: %d final models, signed by %d of %d members",
        decision.model_sha256[:16],
        len(decision.included),
        len(flood.signatures),
        len(members.keys),
    )


async def _attack(
    node: Any, transport: Any, members: Members, study: str, steps: int, attack: str
) -> None:
    """ADVERSARY MODE (tests and demos only): the agreement steps as a Byzantine member
    running ``attack`` of gossip/consensus_attacks.py, which may send each peer something
    else, or nothing (no message at all is posted to a peer it sends nothing); it signs no
    agreed hash and sends no share."""
    log.warning("ADVERSARY MODE: consensus attack %r", attack)
    attacker = ConsensusAttacker(
        node.identity,
        attack,
        study,
        node.study.state(),
        [p.public_key for p in members.peers],
        steps,
    )
    for step in range(1, steps + 1):
        attacker.prepare(step)
        messages = {}
        for p in members.peers:
            offers = tuple(attacker.outgoing_to(step, p.public_key))
            if offers:
                messages[p.name] = ConsensusMessage(study, step, offers)
        timeout = node.config.consensus.start_timeout_s if step == 1 else 1.0
        got = await _exchange(node, transport, members, step, messages, timeout)
        attacker.receive(step, [d for m in got.values() for d in m.offers])
    node.consensus_inbox.closed = True
    node.state.consensus = {"attack": attack, "steps": steps}


class PooledRound:
    """This node's side of the pooled evaluation: its own share, the others' as they come."""

    def __init__(self, node: Any, members: Members, study: str, decision: cs.Decision) -> None:
        self.node = node
        self.members = members
        self.spec = pe.BinSpec()
        self.session = pooled.session_label(study, decision.model_sha256)
        me = node.identity.public_key
        self.partners = {k: sorted(members.keys - {k}) for k in members.keys}
        y, p = _agreed_scores(node, decision.model)
        self.own_share, self.own = pooled.hospital_share(
            node.identity, self.partners[me], self.session, y, p, self.spec
        )
        self.length = pe.vector_length(self.spec)
        self.vectors = {
            me: pooled.decode_share(self.own_share, self.session, members.keys, self.length)[1]
        }

    def take(self, shares: tuple[bytes, ...], via: str) -> list[bytes]:
        """Keep each new valid share; returns the new ones (to forward)."""
        new = []
        for share in shares:
            try:
                owner, vector = pooled.decode_share(
                    share, self.session, self.members.keys, self.length
                )
            except pooled.PooledError as exc:
                self.node.record_rejection(
                    f"consensus_share_{exc.why}", str(exc), sender=via, round_=None
                )
                continue
            if owner not in self.vectors:
                self.vectors[owner] = vector
                new.append(share)
        return new

    def report(self) -> dict[str, Any]:
        name = self.members.names[self.node.identity.public_key]
        missing = sorted(self.members.names[k] for k in self.members.keys - set(self.vectors))
        if missing:
            return {
                "computed": False,
                "why": f"no share from {', '.join(missing)} (dropout recovery is not carried "
                "over HTTP yet)",
                "own": {name: pe.figures(self.own, self.spec)},
            }
        summer = SecureSum(self.partners, self.length)
        for owner, vector in self.vectors.items():
            summer.add(owner, vector)
        total = pe.from_vector(summer.total(), self.spec)
        report = pe.pooled_report({name: self.own}, total, self.spec)
        report["computed"] = True
        report["members"] = sorted(self.members.names.values())
        return report
