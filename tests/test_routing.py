"""Per-peer routing: direct first, relays when the direct path gives no answer, every relay
at once, a refusal final."""

from __future__ import annotations

import asyncio

from murmur.crypto.allowlist import Peer
from murmur.crypto.identity import generate_identity
from murmur.gossip.probe import Contact, Reach
from murmur.gossip.routing import RoutedTransport
from murmur.gossip.transport import SendResult

KEY = generate_identity("hospital_b").public_key


class Fake:
    """A transport that answers every call with ``status`` and counts the calls."""

    def __init__(self, status: int | None, reason: str = "accepted") -> None:
        self.status, self.reason, self.calls = status, reason, 0

    async def send(self, peer: Peer, envelope: bytes, signer=None) -> SendResult:  # type: ignore[no-untyped-def]
        self.calls += 1
        ok = self.status == 202
        return SendResult(peer.name, ok, self.status, self.reason if self.status else "timeout", 0)

    async def probe(self, peer: Peer, probe: bytes, timeout_s: float) -> Contact:
        self.calls += 1
        reason = "admitted" if self.status == 200 else self.reason
        return Contact.from_answer(self.status, reason, "", source="probe")


def _send(routed: RoutedTransport, peer: Peer) -> SendResult:
    return asyncio.run(routed.send(peer, b"envelope"))


def test_direct_answer_is_used_and_relays_are_not_asked() -> None:
    direct, relay = Fake(202), Fake(202)
    routed = RoutedTransport(direct, {"r1": relay})  # type: ignore[dict-item]
    result = _send(routed, Peer("b", "https://10.0.0.2:8700", KEY, ("r1",)))
    assert result.ok and (direct.calls, relay.calls) == (1, 0)


def test_no_answer_directly_goes_through_every_relay_and_the_first_success_counts() -> None:
    direct, down, up = Fake(None), Fake(None), Fake(202)
    routed = RoutedTransport(direct, {"r1": down, "r2": up})  # type: ignore[dict-item]
    result = _send(routed, Peer("b", "https://10.0.0.2:8700", KEY, ("r1", "r2")))
    assert result.ok
    assert (direct.calls, down.calls, up.calls) == (1, 1, 1)


def test_a_refusal_is_final_and_a_relay_only_peer_never_uses_the_direct_path() -> None:
    direct, relay = Fake(409, "old_round"), Fake(202)
    routed = RoutedTransport(direct, {"r1": relay})  # type: ignore[dict-item]
    refused = _send(routed, Peer("b", "https://10.0.0.2:8700", KEY, ("r1",)))
    assert (refused.ok, refused.reason, relay.calls) == (False, "old_round", 0)
    relay_only = _send(routed, Peer("b", "", KEY, ("r1",)))
    assert relay_only.ok and direct.calls == 1 and relay.calls == 1


def test_a_peer_with_no_usable_route_is_a_failed_send_not_an_error() -> None:
    routed = RoutedTransport(None, {})
    result = _send(routed, Peer("b", "", KEY, ("unknown_relay",)))
    assert (result.ok, result.status, result.reason) == (False, None, "no_route")
    contact = asyncio.run(routed.probe(Peer("b", "", KEY, ("unknown_relay",)), b"", 1))
    assert contact.reach is Reach.UNREACHABLE


def test_probes_fall_back_to_relays_like_sends() -> None:
    direct, relay = Fake(None), Fake(200)
    routed = RoutedTransport(direct, {"r1": relay})  # type: ignore[dict-item]
    contact = asyncio.run(routed.probe(Peer("b", "https://x:1", KEY, ("r1",)), b"", 1))
    assert contact.reach is Reach.ADMITTED and relay.calls == 1
