"""Peer liveness bookkeeping: down after silent rounds, up when it speaks, and which
neighbours count toward min_neighbours (gossip/liveness.py, gossip/probe.py)."""

from __future__ import annotations

import pytest
from murmur.gossip.liveness import PeerLiveness
from murmur.gossip.probe import Contact, Reach, parse_answer


def admitted(source: str = "probe") -> Contact:
    if source == "probe":
        return Contact.from_answer(200, "admitted", "", source="probe")
    return Contact.from_answer(202, "accepted", "", source="send")


def test_a_silent_peer_goes_down_once_and_comes_back_when_it_speaks() -> None:
    live = PeerLiveness(["b", "c"], down_after=3)
    changes = [live.round_finished(r, heard={"b"}) for r in (1, 2, 3, 4, 5)]
    assert [len(c) for c in changes] == [0, 0, 1, 0, 0]  # one change, not one per round
    (down,) = changes[2]
    assert (down.peer, down.up, down.round) == ("c", False, 3)
    assert "rounds 1..3" in down.why and "never heard" in down.why
    assert live.live() == ["b"]
    assert live.spoke("b", 6) is None  # b was never down
    back = live.spoke("c", 6)
    assert back is not None and back.up and back.round == 6
    assert live.live() == ["b", "c"] and live.status("c")["since_round"] == 6
    assert live.round_finished(6, heard={"b"}) == []  # its silence counts afresh from here
    assert live.status("c")["silent_rounds"] == 1


def test_a_peer_heard_in_time_is_never_marked_down() -> None:
    live = PeerLiveness(["b"], down_after=2)
    for r in range(1, 10):
        assert live.round_finished(r, heard={"b"} if r % 2 else set()) == []
    assert live.status("b")["last_heard_round"] == 9


def test_only_up_and_admitting_neighbours_count() -> None:
    live = PeerLiveness(["b", "c", "d"], down_after=1)
    assert live.counted() == []  # nobody asked yet
    live.record_contact("b", admitted())
    live.record_contact(
        "c", Contact.from_answer(403, "unknown_sender", "not listed", source="probe")
    )
    live.record_contact("d", admitted())
    live.round_finished(1, heard={"b", "c"})  # d silent: down
    assert live.counted() == ["b"]
    assert live.counted(exclude={"b"}) == []
    reasons = live.not_counted({})
    assert reasons["c"] == "not admitting us (HTTP 403 unknown_sender: not listed)"
    assert reasons["d"].startswith("down since round 1")


def test_a_probe_does_not_hide_a_refusal_of_our_envelopes_content() -> None:
    live = PeerLiveness(["b", "c"], down_after=3)
    live.record_contact("b", Contact.from_answer(422, "shape_mismatch", "(2, 30)", source="send"))
    live.record_contact("b", admitted())  # the probe cannot check the model's shapes
    assert live.counted() == [] and "shape_mismatch" in live.not_counted({})["b"]
    live.record_contact("b", admitted("send"))  # a send that succeeds clears it
    assert live.counted() == ["b"]
    live.record_contact("c", Contact.from_answer(403, "unknown_sender", "", source="send"))
    live.record_contact("c", admitted())  # the peer's operator admitted us: the probe says so
    assert live.counted() == ["b", "c"]


@pytest.mark.parametrize(
    ("status", "reason", "reach"),
    [
        (202, "accepted", Reach.ADMITTED),
        (409, "old_round", Reach.ADMITTED),  # authenticated, merely late
        (409, "too_far_ahead", Reach.ADMITTED),
        (403, "unknown_sender", Reach.REFUSED),
        (400, "stale", Reach.REFUSED),
        (None, "unreachable: ClientConnectorError", Reach.UNREACHABLE),
        (None, "timeout", Reach.UNREACHABLE),
    ],
)
def test_send_results_are_read_as_evidence(status: int | None, reason: str, reach: Reach) -> None:
    contact = Contact.from_answer(status, reason, "", source="send")
    assert contact.reach is reach
    if reach is Reach.UNREACHABLE:
        assert not contact.detail.startswith("unreachable")


def test_only_a_murmur_answer_counts_as_admission() -> None:
    assert admitted().reach is Reach.ADMITTED
    other = Contact.from_answer(200, *parse_answer(200, "<html>hello</html>"), source="probe")
    assert other.reach is Reach.REFUSED and "not a murmur answer" in other.detail
    old = Contact.from_answer(404, *parse_answer(404, "404: Not Found"), source="probe")
    assert old.reach is Reach.REFUSED and "older murmur" in old.describe()


def test_a_peers_words_cannot_break_a_log_line() -> None:
    contact = Contact.from_answer(403, "unknown_sender", "evil\nFAKE LOG LINE", source="probe")
    assert "\n" not in contact.detail and "FAKE LOG LINE" in contact.detail


def test_down_after_must_be_at_least_one_round() -> None:
    with pytest.raises(ValueError, match="down_after"):
        PeerLiveness(["b"], down_after=0)
