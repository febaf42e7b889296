"""The per-round inbox: bounded buffering, past rounds dropped, deadlines, catch-up quorum."""

from __future__ import annotations

import asyncio
import time

from murmur.gossip.rounds import CatchUp, InboxVerdict, RoundInbox, catch_up_quorum


async def test_collect_returns_as_soon_as_everyone_arrived() -> None:
    inbox: RoundInbox[str] = RoundInbox(max_round=10)
    assert inbox.offer("b", 1, "mb") is InboxVerdict.ACCEPTED
    assert inbox.offer("c", 1, "mc") is InboxVerdict.ACCEPTED
    start = time.monotonic()
    got = await inbox.collect(1, ["b", "c"], deadline_s=5, stop=asyncio.Event())
    assert got.messages == {"b": "mb", "c": "mc"} and got.missing == []
    assert time.monotonic() - start < 1


async def test_a_dead_neighbour_costs_at_most_the_deadline() -> None:
    inbox: RoundInbox[str] = RoundInbox(max_round=10)
    inbox.offer("b", 1, "mb")
    start = time.monotonic()
    got = await inbox.collect(1, ["b", "dead"], deadline_s=0.3, stop=asyncio.Event())
    elapsed = time.monotonic() - start
    assert got.missing == ["dead"] and set(got.messages) == {"b"}
    assert 0.25 <= elapsed < 1.0


async def test_a_late_arrival_wakes_the_collector() -> None:
    inbox: RoundInbox[str] = RoundInbox(max_round=10)

    async def arrive_later() -> None:
        await asyncio.sleep(0.1)
        inbox.offer("b", 1, "late")

    async with asyncio.TaskGroup() as group:
        group.create_task(arrive_later())
        got = await inbox.collect(1, ["b"], deadline_s=5, stop=asyncio.Event())
    assert got.messages == {"b": "late"} and got.waited_s < 2


async def test_stop_ends_the_wait() -> None:
    inbox: RoundInbox[str] = RoundInbox(max_round=10)
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.1, stop.set)
    got = await inbox.collect(1, ["b"], deadline_s=10, stop=stop)
    assert got.missing == ["b"] and got.waited_s < 2


def test_past_rounds_duplicates_and_far_future_are_refused() -> None:
    inbox: RoundInbox[str] = RoundInbox(max_round=10, rounds_ahead=2)
    inbox.advance_to(3)
    assert inbox.offer("b", 2, "old") is InboxVerdict.OLD_ROUND
    assert inbox.offer("b", 3, "x") is InboxVerdict.ACCEPTED
    assert inbox.offer("b", 3, "y") is InboxVerdict.DUPLICATE
    assert inbox.offer("b", 5, "ahead") is InboxVerdict.ACCEPTED
    assert inbox.offer("b", 6, "too far") is InboxVerdict.TOO_FAR_AHEAD
    assert inbox.offer("b", 11, "past the plan") is InboxVerdict.TOO_FAR_AHEAD


def test_advancing_forgets_older_rounds() -> None:
    inbox: RoundInbox[str] = RoundInbox(max_round=10)
    inbox.offer("b", 1, "r1")
    inbox.offer("b", 2, "r2")
    inbox.advance_to(2)
    assert inbox.offer("c", 1, "late") is InboxVerdict.OLD_ROUND
    assert 1 not in inbox._by_round and inbox._by_round[2] == {"b": "r2"}


def test_catch_up_needs_a_quorum_and_names_who_vouched() -> None:
    inbox: RoundInbox[str] = RoundInbox(max_round=20, rounds_ahead=2)
    inbox.offer("liar", 19, "claims the end")  # refused as too far ahead, but its round is noted
    assert inbox.catch_up_round(quorum=2) is None  # one peer alone cannot move us
    inbox.offer("honest", 7, "x")
    assert inbox.catch_up_round(quorum=2) == CatchUp(7, ("honest", "liar"))  # second-highest
    inbox.advance_to(7)
    assert inbox.catch_up_round(quorum=2) is None


def test_distrusted_peers_and_rounds_beyond_the_plan_never_vouch() -> None:
    inbox: RoundInbox[str] = RoundInbox(max_round=20, rounds_ahead=2)
    assert inbox.offer("dreamer", 21, "past the plan") is InboxVerdict.TOO_FAR_AHEAD
    inbox.offer("quarantined", 15, "x")
    inbox.offer("honest", 15, "y")
    assert inbox.catch_up_round(quorum=2, exclude={"quarantined"}) is None
    assert inbox.catch_up_round(quorum=2) == CatchUp(15, ("honest", "quarantined"))
    assert "dreamer" not in inbox.highest_round_seen


def test_the_catch_up_quorum_is_never_one_peer_unless_there_is_only_one() -> None:
    assert catch_up_quorum(f=0, neighbours=1) == 1  # a lone neighbour is the only witness
    assert catch_up_quorum(f=0, neighbours=2) == 2
    assert catch_up_quorum(f=0, neighbours=3) == 2
    assert catch_up_quorum(f=0, neighbours=8) == 5  # a majority of eight
    assert catch_up_quorum(f=1, neighbours=3) == 2
    assert catch_up_quorum(f=3, neighbours=4) == 4  # f + 1, bounded by the neighbours
    assert catch_up_quorum(f=2, neighbours=10) == 6


async def test_collect_waits_only_for_live_senders_but_keeps_every_arrival() -> None:
    inbox: RoundInbox[str] = RoundInbox(max_round=10)
    inbox.offer("b", 1, "mb")
    start = time.monotonic()
    got = await inbox.collect(1, ["b", "down"], deadline_s=5, stop=asyncio.Event(), wait_for=["b"])
    assert time.monotonic() - start < 1 and got.missing == ["down"]
    inbox.offer("down", 1, "back")
    got = await inbox.collect(1, ["b", "down"], deadline_s=5, stop=asyncio.Event(), wait_for=[])
    assert got.messages == {"b": "mb", "down": "back"} and got.missing == []
