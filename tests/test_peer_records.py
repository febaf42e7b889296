"""Signed peer records: refused with a reason unless signed by an allowlisted key, fresh and
newer; accepted ones move where a peer is reached; they travel over /records."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import pytest
from murmur.crypto.allowlist import Allowlist, Peer
from murmur.crypto.identity import generate_identity, load_identity
from murmur.gossip.peer_records import PeerRecord, RecordBook, RecordError, encode_records
from murmur.gossip.routing import RoutedTransport
from murmur.gossip.transport import PeerTransport

from tests.netutil import build_node

A, B, STRANGER = (generate_identity(n) for n in ("hospital_a", "hospital_b", "stranger"))
PEER_A = Peer("hospital_a", "http://10.0.0.1:8700", A.public_key)
NOW = 1_800_000_000.0


def book() -> RecordBook:
    return RecordBook(Allowlist([PEER_A]))


def test_a_valid_record_moves_the_peer_and_a_newer_one_replaces_it() -> None:
    records = book()
    first = PeerRecord.make(A, ["https://10.0.0.9:8700"], ["relay_a"], NOW)
    records.offer(PeerRecord.from_json(first.to_json()), NOW)  # as it arrives on the wire
    moved = records.current(PEER_A, NOW + 1)
    assert (moved.address, moved.relays, moved.public_key) == (
        "https://10.0.0.9:8700",
        ("relay_a",),
        A.public_key,
    )
    newer = PeerRecord.make(A, [], ["relay_b"], NOW + 10)
    records.offer(newer, NOW + 10)
    assert records.current(PEER_A, NOW + 11).relays == ("relay_b",)
    # Once expired, the config's entry is what counts again.
    assert records.current(PEER_A, NOW + 10 + 25 * 3600) == PEER_A


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda: PeerRecord.make(STRANGER, ["https://x:1"], [], NOW), "not_allowlisted"),
        (
            lambda: dataclasses.replace(
                PeerRecord.make(A, ["https://x:1"], [], NOW), addresses=("https://evil:1",)
            ),
            "bad_signature",
        ),
        (lambda: PeerRecord.make(A, ["https://x:1"], [], NOW - 90_000), "expired"),
        (lambda: PeerRecord.make(A, ["https://x:1"], [], NOW, ttl_s=30 * 86400), "too_long"),
    ],
)
def test_bad_records_are_refused_with_a_reason(make, why: str) -> None:  # type: ignore[no-untyped-def]
    records = book()
    with pytest.raises(RecordError) as err:
        records.offer(make(), NOW)
    assert err.value.why == why
    assert records.current(PEER_A, NOW) == PEER_A


def test_an_older_record_and_a_malformed_one_are_refused() -> None:
    records = book()
    records.offer(PeerRecord.make(A, ["https://x:1"], [], NOW), NOW)
    with pytest.raises(RecordError, match="not_newer"):
        records.offer(PeerRecord.make(A, ["https://y:1"], [], NOW - 5), NOW)
    bad = PeerRecord.make(A, ["https://x:1"], [], NOW).to_json() | {"addresses": ["ftp://x"]}
    with pytest.raises(RecordError, match="malformed"):
        PeerRecord.from_json(bad)


def test_records_posted_to_a_node_over_http_are_checked_one_by_one(tmp_path: Path) -> None:
    """A neighbour's bundle over POST /records: the valid record of an allowlisted peer is
    kept (and followed by the node's routing); a stranger's is refused and counted."""
    node = build_node(tmp_path)
    sender_peer = node.peers[0]
    sender = load_identity(tmp_path / "keys" / f"{sender_peer.name}.key")
    now = time.time()
    good = PeerRecord.make(sender, ["http://127.0.0.1:1"], [], now)
    strangers = PeerRecord.make(STRANGER, ["http://127.0.0.1:2"], [], now)

    async def go() -> tuple[int | None, str]:
        from murmur.node.api import start_api

        api = await start_api(node, None)
        try:
            assert api.peer is not None
            target = Peer(node.config.node.name, api.peer.address, node.identity.public_key)
            async with PeerTransport(identity=sender, send_timeout_s=5) as transport:
                return await transport.post_records(target, encode_records([good, strangers]))
        finally:
            await api.close()

    assert asyncio.run(go()) == (202, "accepted")
    assert node.rejected["record_not_allowlisted"] == 1
    routed = RoutedTransport(None, {}, node.record_book)
    assert routed._where(sender_peer).address == "http://127.0.0.1:1"
    node.audit.close()


def test_records_held_survive_a_restart_and_an_edited_file_brings_back_nothing_unsigned(
    tmp_path: Path,
) -> None:
    """The book is saved after a bundle that changed it and offered again at start, record by
    record: the peer is still reached where it moved; a forged record in the file is not."""
    from murmur.node.records import RECORDS_FILE, answer_records

    node = build_node(tmp_path)
    mover = node.peers[0]
    mover_identity = load_identity(tmp_path / "keys" / f"{mover.name}.key")
    record = PeerRecord.make(mover_identity, ["http://10.9.9.9:8700"], [], time.time())
    assert answer_records(node, encode_records([record]), mover) == (202, "accepted")
    node.audit.close()

    restarted = _restart(node)
    assert restarted.record_book.current(mover, time.time()).address == "http://10.9.9.9:8700"
    restarted.audit.close()

    # Someone edits the file: a record "by" the mover signed with another key, and junk.
    forged = dataclasses.replace(
        PeerRecord.make(STRANGER, ["http://10.6.6.6:1"], [], time.time() + 5),
        public_key=mover.public_key,
    )
    path = node.state_dir / RECORDS_FILE
    path.write_bytes(encode_records([forged]))
    again = _restart(node)
    assert again.record_book.current(mover, time.time()).address == mover.address
    again.audit.close()
    path.write_bytes(b"{not json")
    last = _restart(node)
    assert last.record_book.held(time.time()) == []
    last.audit.close()


def _restart(node):  # type: ignore[no-untyped-def]
    """The same hospital's node again, from its config and state directory."""
    from murmur.node.config import load_config
    from murmur.node.node import HospitalNode

    return HospitalNode(load_config(node.config.source))
