"""Streamed envelopes (gossip/wire/stream.py, docs/protocol.md "Streamed envelopes"): a body
over 1 MiB is signed over its chunks' digests and encrypted chunk by chunk; a receiver
refuses a bad header before reading a chunk, each bad chunk as it comes, and the listener
leaves the rest of a refused body unread. Smaller bodies keep the whole envelope."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from murmur.crypto.allowlist import Allowlist, Peer
from murmur.crypto.identity import Identity, generate_identity
from murmur.gossip.transport import PeerTransport
from murmur.gossip.wire import (
    DEFAULT_CHUNK_BYTES,
    EnvelopeOpener,
    ModelUpdate,
    RejectReason,
    WireError,
    WireLimits,
    _envelope_prefix,
    _parse_envelope,
    build_envelope,
    is_streamed,
    peek_envelope,
)
from murmur.gossip.wire.stream import StreamHeader, parse_stream_header
from murmur.models.params import get_state
from murmur.node.api import NodeApi, operator_token, start_api

from tests.netutil import make_network
from tests.test_http import auth_line, peer_identity

N = 300_000  # 1.2 MB of float32: three chunks of 512 KiB
SPEC = {"w": ((N,), "float32"), "b": ((4,), "float32")}
NOW = 1_800_000_000.0


def model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal(N, dtype=np.float32), "b": np.ones(4, np.float32)}


@pytest.fixture(scope="module")
def keys() -> dict[str, Identity]:
    return {name: generate_identity(name) for name in ("alice", "bob", "carol", "mallory")}


def opener_for(keys: dict[str, Identity], spec: Any = SPEC, **limits: Any) -> EnvelopeOpener:
    allowlist = Allowlist([Peer(n, f"http://{n}", keys[n].public_key) for n in ("alice", "carol")])
    return EnvelopeOpener(keys["bob"], allowlist, spec, WireLimits(**limits))


def streamed(keys: dict[str, Identity], sender: str = "alice", **kwargs: Any) -> bytes:
    recipients = kwargs.pop("recipients", [keys["bob"].public_key])
    data = build_envelope(
        ModelUpdate(model(kwargs.pop("seed", 0))), keys[sender], recipients, 1, now=NOW, **kwargs
    )
    assert is_streamed(data)
    return data


def split(data: bytes) -> tuple[StreamHeader, bytes, list[bytes]]:
    """(header, its bytes, the encrypted chunks) of a streamed envelope."""
    header, end = parse_stream_header(data, WireLimits(), len(data))
    chunks, offset = [], end
    for index in range(header.chunk_count):
        size = header.chunk_wire_bytes(index)
        chunks.append(data[offset : offset + size])
        offset += size
    assert offset == len(data)
    return header, data[:end], chunks


def resigned(header: StreamHeader, signer: Identity) -> bytes:
    """The header's bytes with a signature by ``signer`` (not its sender: a forgery)."""
    envelope = dataclasses.replace(header.envelope, signature=signer.sign(header.signed_digest()))
    return dataclasses.replace(header, envelope=envelope).encode()


def refused_on_header(opener: EnvelopeOpener, data: bytes, header_bytes: bytes) -> WireError:
    """The refusal raised while only the header has been fed (no chunk byte)."""
    opening = opener.begin_stream(len(data), NOW)
    with pytest.raises(WireError) as caught:
        opening.feed(header_bytes)
    assert opening.consumed == len(header_bytes)
    return caught.value


# ---------------------------------------------------------------------------- round trip


def test_a_large_update_streams_and_opens_to_the_same_tensors(keys: dict[str, Identity]) -> None:
    data = streamed(keys)
    header, _, chunks = split(data)
    assert header.chunk_bytes == DEFAULT_CHUNK_BYTES and len(chunks) == 3
    opened = opener_for(keys).open(data, now=NOW)
    assert np.array_equal(opened.update.tensors["w"], model()["w"])
    assert not opened.update.tensors["w"].flags.writeable
    assert opened.sender.name == "alice" and opened.round == 1
    # The receipt is a whole envelope's: verifiable alone, evidence like any other.
    assert opened.receipt.verify()
    assert opened.body_sha256 == peek_envelope(data).body_sha256 == header.chunks_sha256.hex()


def test_fed_in_odd_pieces_it_opens_the_same(keys: dict[str, Identity]) -> None:
    data = streamed(keys, chunk_bytes=100_000)
    opening = opener_for(keys).begin_stream(len(data), NOW)
    offset = 0
    for size in [7, 3000, 99_000, 250_001] * 40:
        if offset >= len(data):
            break
        opening.feed(data[offset : offset + size])
        offset += size
    assert opening.wants() == 0 and opening.streamed
    assert np.array_equal(opening.finish().update.tensors["w"], model()["w"])


def test_small_updates_keep_the_whole_envelope(keys: dict[str, Identity]) -> None:
    small = {"w": np.ones(1000, np.float32), "b": np.ones(4, np.float32)}
    data = build_envelope(ModelUpdate(small), keys["alice"], [keys["bob"].public_key], 1)
    assert not is_streamed(data) and data[0] == 0x8C
    raw = _parse_envelope(data, WireLimits(), len(data))
    assert _envelope_prefix(raw) + raw.body == data  # the one canonical whole encoding
    # A large one may be sent whole too (stream_above=None), and is still taken.
    whole = build_envelope(
        ModelUpdate(model()), keys["alice"], [keys["bob"].public_key], 1, stream_above=None
    )
    assert not is_streamed(whole)
    opener = opener_for(keys)
    assert np.array_equal(opener.open(whole).update.tensors["w"], model()["w"])
    opening = opener_for(keys).begin_stream(len(whole))  # the listener's path takes it whole
    opening.feed(whole[:1000])
    opening.feed(whole[1000:])
    assert not opening.streamed and opening.finish().round == 1


# ---------------------------------------------------------------------------- the header


def test_a_bad_header_is_refused_before_any_chunk(keys: dict[str, Identity]) -> None:
    data = streamed(keys)
    header, header_bytes, _ = split(data)
    opener = opener_for(keys)
    # A forged signature (another admitted key signed it).
    forged = resigned(header, keys["carol"])
    assert refused_on_header(opener, data, forged).reason is RejectReason.BAD_SIGNATURE
    # An unknown sender, a wrong recipient.
    outsider = streamed(keys, sender="mallory")
    _, outsider_header, _ = split(outsider)
    refusal = refused_on_header(opener, outsider, outsider_header)
    assert refusal.reason is RejectReason.UNKNOWN_SENDER
    elsewhere = streamed(keys, recipients=[keys["carol"].public_key])
    _, elsewhere_header, _ = split(elsewhere)
    refusal = refused_on_header(opener, elsewhere, elsewhere_header)
    assert refusal.reason is RejectReason.WRONG_RECIPIENT
    # The declared size over this node's limit.
    small_limit = opener_for(keys, max_message_bytes=1_000_000)
    opening = small_limit.begin_stream(999_000, NOW)  # what Content-Length claimed
    with pytest.raises(WireError) as caught:
        opening.feed(header_bytes)
    assert caught.value.reason is RejectReason.TOO_LARGE
    # A replay of an accepted one.
    opener.open(data, now=NOW)
    assert refused_on_header(opener, data, header_bytes).reason is RejectReason.REPLAY
    # Another sender's envelope posted by an authenticated peer.
    opening = opener.begin_stream(len(data), NOW, sender=keys["carol"].public_key)
    with pytest.raises(WireError) as caught:
        opening.feed(header_bytes)
    assert caught.value.reason is RejectReason.SENDER_MISMATCH


def test_a_header_declaring_another_length_is_refused_before_any_chunk(
    keys: dict[str, Identity],
) -> None:
    data = streamed(keys)
    _, header_bytes, chunks = split(data)
    opener = opener_for(keys)
    for length in (len(data) - len(chunks[-1]), len(data) + 5):  # truncated, extra bytes
        opening = opener.begin_stream(length, NOW)
        with pytest.raises(WireError) as caught:
            opening.feed(header_bytes)
        assert caught.value.reason is RejectReason.MALFORMED
        assert "declares" in caught.value.detail


def test_a_body_of_another_model_is_refused_after_the_first_chunk(
    keys: dict[str, Identity],
) -> None:
    data = streamed(keys)
    _, header_bytes, chunks = split(data)
    other = {"w": ((N - 1,), "float32"), "b": ((4,), "float32")}
    opening = opener_for(keys, spec=other).begin_stream(len(data), NOW)
    opening.feed(header_bytes)
    with pytest.raises(WireError) as caught:
        opening.feed(chunks[0])
    assert caught.value.reason is RejectReason.SHAPE_MISMATCH
    assert caught.value.signed is not None  # authentic: it counts against the sender


# ---------------------------------------------------------------------------- the chunks


def fed(opener: EnvelopeOpener, header_bytes: bytes, chunks: list[bytes]) -> Any:
    """Feed a header and chunks and finish: the opened envelope, or the refusal."""
    opening = opener.begin_stream(len(header_bytes) + sum(map(len, chunks)), NOW)
    try:
        opening.feed(header_bytes)
        for chunk in chunks:
            opening.feed(chunk)
        return opening.finish()
    except WireError as error:
        return error


def test_a_tampered_reordered_or_foreign_chunk_is_refused(keys: dict[str, Identity]) -> None:
    data = streamed(keys)
    _, header_bytes, chunks = split(data)
    opener = opener_for(keys)
    tampered = list(chunks)
    tampered[1] = tampered[1][:100] + bytes([tampered[1][100] ^ 1]) + tampered[1][101:]
    reordered = [chunks[1], chunks[0], chunks[2]]
    _, _, foreign = split(streamed(keys, seed=1))  # the same sender's other message
    swapped = [chunks[0], foreign[1], chunks[2]]
    for bad, index in ((tampered, 1), (reordered, 0), (swapped, 1)):
        refusal = fed(opener, header_bytes, bad)
        assert isinstance(refusal, WireError)
        assert refusal.reason is RejectReason.BAD_SIGNATURE
        assert f"chunk {index} of 3" in refusal.detail
        assert refusal.signed is None  # not what the sender signed: not held against it
    opened = fed(opener, header_bytes, chunks)  # nothing was recorded: the real one opens
    assert np.array_equal(opened.update.tensors["w"], model()["w"])


def test_a_truncated_stream_or_extra_bytes_are_refused(keys: dict[str, Identity]) -> None:
    data = streamed(keys)
    opener = opener_for(keys)
    opening = opener.begin_stream(len(data), NOW)
    opening.feed(data[:-10])
    with pytest.raises(WireError) as caught:
        opening.finish()
    assert caught.value.reason is RejectReason.MALFORMED and "2 of its 3 chunks" in (
        caught.value.detail
    )
    opening = opener.begin_stream(len(data), NOW)
    with pytest.raises(WireError) as caught:
        opening.feed(data + b"\x00")
    assert caught.value.reason is RejectReason.MALFORMED
    for bad in (data[:-10], data + b"\x00"):  # as bytes: the declared length disagrees
        with pytest.raises(WireError) as caught:
            opener.open(bad, now=NOW)
        assert caught.value.reason is RejectReason.MALFORMED


def test_a_header_not_in_canonical_encoding_is_refused(keys: dict[str, Identity]) -> None:
    data = streamed(keys)
    _, header_bytes, chunks = split(data)
    # The round as a uint64 instead of its shortest form (a fixint).
    longer = header_bytes.replace(b"\xa5round\x01", b"\xa5round\xcf" + (1).to_bytes(8, "big"))
    assert longer != header_bytes
    refusal = fed(opener_for(keys), longer, chunks)
    assert isinstance(refusal, WireError) and refusal.reason is RejectReason.MALFORMED


# ---------------------------------------------------------------------------- over HTTP


@asynccontextmanager
async def running(tmp_path: Path) -> AsyncIterator[tuple[Any, NodeApi]]:
    """hospital_0 of two, listening on loopback, with an MLP of 385k parameters on the 30
    features (1.5 MB: a streamed envelope), as tests/test_http.py's `running`."""
    from murmur.node.config import load_config
    from murmur.node.node import HospitalNode

    net = make_network(tmp_path, "--nodes", "2", "--no-dp", "--aggregator", "mean")
    name = net.nodes[0].name
    net.edit_config(name, "node", listen="127.0.0.1:0")
    net.edit_config(name, "operator", listen="127.0.0.1:0")
    net.edit_config(name, "model", hidden=[4096, 64])
    path = net.node(name).config_path
    path.write_text(path.read_text().replace('name = "logreg"', 'name = "mlp"'))
    node = HospitalNode(load_config(path))
    assert node.config.model.name == "mlp"
    api = await start_api(node, operator_token(node.config))
    try:
        yield node, api
    finally:
        await api.close()
        node.audit.close()


def big_state(node: Any, scale: float = 0.0) -> dict[str, np.ndarray]:
    from murmur.models.nets import build_model

    state = get_state(build_model("mlp", (30,), 0, hidden=[4096, 64]))
    assert set(state) == set(node.receiver.opener._spec)
    return {k: v + np.float32(scale) for k, v in state.items()}


async def test_a_streamed_envelope_is_taken_over_http(tmp_path: Path) -> None:
    async with running(tmp_path) as (node, api):
        peer = peer_identity(tmp_path)
        data = build_envelope(ModelUpdate(big_state(node)), peer, [node.identity.public_key], 1)
        assert is_streamed(data) and len(data) > 1_500_000
        target = Peer("hospital_0", api.peer.address, node.identity.public_key)
        async with PeerTransport(identity=peer, send_timeout_s=20) as transport:
            result = await transport.send(target, data)
        assert (result.status, result.reason) == (202, "accepted"), result
        assert node.state.peers["hospital_1"]["last_seen"] is not None
        assert not node.rejected


async def test_a_forged_header_is_refused_without_reading_the_rest(tmp_path: Path) -> None:
    async with running(tmp_path) as (node, api):
        peer = peer_identity(tmp_path)
        other = generate_identity("forger")
        data = build_envelope(ModelUpdate(big_state(node)), peer, [node.identity.public_key], 1)
        header, _, chunks = split(data)
        forged = resigned(header, other) + b"".join(chunks)
        reader, writer = await asyncio.open_connection("127.0.0.1", api.peer.port)
        writer.write(
            b"POST /gossip HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + f"Content-Length: {len(forged)}\r\n".encode()
            + auth_line(node, peer, forged)
            + b"\r\n"
        )
        sent = len(forged) - sum(map(len, chunks)) + len(chunks[0])  # the header, one chunk
        writer.write(forged[:sent])
        await writer.drain()
        started = time.monotonic()
        # The rest is never sent: the answer must come from what was.
        answer = await asyncio.wait_for(reader.read(4096), 10)
        assert time.monotonic() - started < 10
        writer.close()
        assert answer.startswith(b"HTTP/1.1 403") and b'"bad_signature"' in answer
        assert sent < len(forged) / 2
        assert node.rejected["bad_signature"] == 1
        assert node.state.peers["hospital_1"]["last_seen"] is None


async def test_a_tampered_chunk_is_refused_over_http(tmp_path: Path) -> None:
    async with running(tmp_path) as (node, api):
        peer = peer_identity(tmp_path)
        data = build_envelope(ModelUpdate(big_state(node)), peer, [node.identity.public_key], 1)
        _, header_bytes, chunks = split(data)
        chunks[1] = bytes([chunks[1][0] ^ 1]) + chunks[1][1:]
        tampered = header_bytes + b"".join(chunks)
        target = Peer("hospital_0", api.peer.address, node.identity.public_key)
        async with PeerTransport(identity=peer, send_timeout_s=20) as transport:
            result = await transport.send(target, tampered)
            assert (result.status, result.reason) == (403, "bad_signature"), result
            # The real one, sent next, is taken: the tampered copy was not held against it.
            result = await transport.send(target, data)
        assert (result.status, result.reason) == (202, "accepted"), result


async def test_a_large_whole_envelope_and_a_body_not_signed_for_over_http(
    tmp_path: Path,
) -> None:
    async with running(tmp_path) as (node, api):
        peer = peer_identity(tmp_path)
        me = node.identity.public_key
        target = Peer("hospital_0", api.peer.address, node.identity.public_key)
        # A whole envelope over 1 MiB (a node from before streams) goes the streamed
        # listener path and is taken.
        whole = build_envelope(ModelUpdate(big_state(node)), peer, [me], 1, stream_above=None)
        assert not is_streamed(whole) and len(whole) > 1_500_000
        # A streamed body whose request header signed other bytes: `body_mismatch`, found
        # before its last piece is handed to the opener, so nothing of it is accepted.
        data = build_envelope(ModelUpdate(big_state(node, 1.0)), peer, [me], 2)
        signed_for = data[:-1] + bytes([data[-1] ^ 1])
        async with PeerTransport(identity=peer, send_timeout_s=20) as transport:
            result = await transport.send(target, whole)
            assert (result.status, result.reason) == (202, "accepted"), result
            headers = transport.headers(
                target, "/gossip", signed_for, "application/x-murmur-envelope"
            )
            async with transport.session.post(
                api.peer.address + "/gossip", data=data, headers=headers
            ) as response:
                assert response.status == 400
                assert (await response.json()) == {"reason": "body_mismatch"}
        assert node.rejected["body_mismatch"] == 1
        assert "bad_signature" not in node.rejected


@pytest.mark.slow
def test_two_node_processes_exchange_streamed_models_over_loopback(tmp_path: Path) -> None:
    """Two real node processes, an MLP of 385k parameters: every model they send each other
    is a streamed envelope (1.5 MB), and both finish their rounds having taken the other's."""
    net = make_network(
        tmp_path,
        *("--nodes", "2", "--rounds", "2", "--no-dp", "--aggregator", "mean"),
        *("--round-timeout", "60"),
    )
    for node in net.nodes:
        net.edit_config(node.name, "model", hidden=[4096, 64])
        path = node.config_path
        path.write_text(path.read_text().replace('name = "logreg"', 'name = "mlp"'))
    net.start_all()
    try:
        codes = net.wait_all(timeout_s=240)
    finally:
        net.kill_all()
    assert set(codes.values()) == {0}, {n: net.log(n) for n in codes}
    for node in net.nodes:
        status = net.final_status(node.name)
        other = next(n.name for n in net.nodes if n.name != node.name)
        assert [r["received"] for r in status["history"]] == [[other], [other]], status["history"]
        assert not status["rejected"], status["rejected"]
        assert status["bytes_sent"] > 2 * 1_500_000  # two streamed envelopes at least


# ---------------------------------------------------------------------------- to the spool


def test_a_spooling_node_writes_streamed_tensors_to_disk_as_they_come(
    keys: dict[str, Identity], tmp_path: Path
) -> None:
    """Tensors in another order than the receiver's model, straddling chunk boundaries:
    each lands in its place of the spooled model, which is never whole in memory."""
    from murmur.gossip.spool import SpooledModel

    rng = np.random.default_rng(3)
    state = {
        "c": rng.standard_normal((300, 7), dtype=np.float32),
        "a": rng.standard_normal(250_001, dtype=np.float32),
        "b": rng.standard_normal((3, 5, 11), dtype=np.float32),
    }
    spec = {name: (state[name].shape, "float32") for name in ("a", "b", "c")}
    allowlist = Allowlist([Peer("alice", "http://alice", keys["alice"].public_key)])
    opener = EnvelopeOpener(keys["bob"], allowlist, spec, spool=tmp_path)
    data = build_envelope(
        ModelUpdate(state),
        keys["alice"],
        [keys["bob"].public_key],
        1,
        stream_above=0,
        chunk_bytes=4096,
    )
    assert is_streamed(data) and split(data)[0].chunk_count > 200
    opening = opener.begin_stream(len(data), None)
    step = 10_000
    for offset in range(0, len(data), step):
        opening.feed(data[offset : offset + step])
        assert opening._plain is None  # the body is never held: only one chunk at a time
    opened = opener.accept(opening.finish())
    assert isinstance(opened.update.tensors, SpooledModel)
    assert list(opened.update.tensors) == ["a", "b", "c"]  # the receiver's order
    for name, array in state.items():
        assert np.array_equal(opened.update.tensors[name], array)
    # A non-finite value is found there too, and counts against the (authentic) sender.
    state["b"][1, 2, 3] = np.nan
    bad = build_envelope(
        ModelUpdate(state), keys["alice"], [keys["bob"].public_key], 2, stream_above=0
    )
    with pytest.raises(WireError) as caught:
        opener.open(bad)
    assert caught.value.reason is RejectReason.NON_FINITE and "'b'" in caught.value.detail
    assert caught.value.signed is not None


# ---------------------------------------------------------------------------- the document


def test_an_encoder_written_from_the_document_alone_is_accepted(keys: dict[str, Identity]) -> None:
    """docs/protocol.md, "Streamed envelopes", followed with msgpack, hashlib, struct and
    libsodium only (as tests/test_interop.py does for whole envelopes)."""
    import hashlib
    import os
    import struct

    import msgpack
    import nacl.bindings as sodium

    seed = keys["alice"].signing_key.encode()
    pk, sk = sodium.crypto_sign_seed_keypair(seed)
    x_sk = sodium.crypto_sign_ed25519_sk_to_curve25519(sk)
    bob = keys["bob"].public_key
    x_bob = sodium.crypto_sign_ed25519_pk_to_curve25519(bob)
    tensors = model()
    head = bytes(56)
    head_digest = hashlib.sha256(b"murmur-envelope-head\x00" + head).digest()
    body_header = msgpack.packb(
        {
            "tensors": [[name, "float32", list(a.shape)] for name, a in tensors.items()],
            "metrics": {},
            "receipts": [],
            "proofs": [],
            "audit_head": head,
        }
    )
    plain = struct.pack(">I", len(body_header)) + body_header
    plain += b"".join(a.astype("<f4").tobytes() for a in tensors.values())
    length, size = len(plain), 65536
    count = -(-length // size)
    nonce, key = os.urandom(24), os.urandom(32)
    commitment = hashlib.sha256(b"murmur-body-key\x00" + key).digest()
    e_pk, e_sk = sodium.crypto_box_keypair()
    inner = sodium.crypto_box_easy(key, nonce, x_bob, e_sk)
    wrapped = sodium.crypto_box_easy(inner, nonce, x_bob, x_sk)
    recipients = struct.pack(">H", 1) + bob + wrapped
    timestamp_ms, round_ = int(time.time() * 1000), 7
    fixed = struct.pack(">HB", 5, 6) + b"update" + pk + struct.pack(">Q", round_) + head_digest
    sizes = struct.pack(">Q", length) + struct.pack(">I", size)
    common = struct.pack(">Q", timestamp_ms) + nonce + e_pk + commitment + recipients
    ad = b"murmur-stream-body\x00" + fixed + common + sizes
    chunks = [
        sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
            plain[i * size : (i + 1) * size], ad, nonce[:16] + struct.pack(">Q", i), key
        )
        for i in range(count)
    ]
    digests = b"".join(hashlib.sha256(c).digest() for c in chunks)
    rest = hashlib.sha256(
        b"murmur-stream-rest\x00" + common + sizes + hashlib.sha256(digests).digest()
    ).digest()
    signed = hashlib.sha256(b"murmur-envelope\x00" + fixed + rest).digest()
    header = msgpack.packb(
        {
            "version": 5,
            "kind": "update",
            "sender": pk,
            "round": round_,
            "head_digest": head_digest,
            "timestamp_ms": timestamp_ms,
            "nonce": nonce,
            "ephemeral_key": e_pk,
            "key_commitment": commitment,
            "recipients": [[bob, wrapped]],
            "body_length": length,
            "chunk_bytes": size,
            "chunk_digests": digests,
            "signature": sodium.crypto_sign(signed, sk)[:64],
        }
    )
    assert header[0] == 0x8E
    data = header + b"".join(chunks)
    assert len(data) == len(header) + length + 16 * count
    opened = opener_for(keys).open(data)
    assert opened.round == round_ and opened.sender.name == "alice"
    assert np.array_equal(opened.update.tensors["w"], tensors["w"])
    assert opened.body_sha256 == hashlib.sha256(digests).hexdigest()
    assert opened.receipt.rest_digest == rest and opened.receipt.verify()


def test_mutated_streams_are_refused_with_a_reason_code_only(keys: dict[str, Identity]) -> None:
    """Random byte flips, cuts and insertions anywhere in a small streamed envelope, fed in
    random pieces: every one is a `WireError` (no other exception), none is accepted."""
    small = {"w": ((20_000,), "float32"), "b": ((4,), "float32")}
    state = {"w": np.arange(20_000, dtype=np.float32), "b": np.ones(4, np.float32)}
    data = build_envelope(
        ModelUpdate(state),
        keys["alice"],
        [keys["bob"].public_key],
        1,
        now=NOW,
        stream_above=0,
        chunk_bytes=4096,
    )
    assert opener_for(keys, spec=small).open(data, now=NOW).round == 1  # unmutated: taken
    header_length = split(data)[1].__len__()
    rng = np.random.default_rng(5)
    reasons = set()
    for trial in range(300):
        mutated = bytearray(data)
        what = trial % 3
        if what == 0:  # flip a byte, in the header one time in two
            at = int(rng.integers(0, header_length if trial % 2 else len(data)))
            mutated[at] ^= int(rng.integers(1, 256))
        elif what == 1:
            del mutated[int(rng.integers(1, len(data))) :]
        else:
            at = int(rng.integers(0, len(data)))
            mutated[at:at] = bytes(rng.integers(0, 256, int(rng.integers(1, 40)), np.uint8))
        opening = opener_for(keys, spec=small).begin_stream(len(mutated), NOW)
        with pytest.raises(WireError) as caught:
            offset = 0
            while offset < len(mutated):
                step = int(rng.integers(1, 20_000))
                opening.feed(bytes(mutated[offset : offset + step]))
                offset += step
            opening.finish()
        reasons.add(caught.value.reason)
    assert RejectReason.BAD_SIGNATURE in reasons and RejectReason.MALFORMED in reasons
