"""Compression: the codecs (gossip/compression.py), compressed tensors on the wire and the
receiver's checks (gossip/wire/compressed.py, opener.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from murmur.crypto.allowlist import Allowlist, Peer
from murmur.crypto.identity import generate_identity
from murmur.gossip.compression import (
    FORM_BITMAP,
    FORM_INDEX,
    FORM_INT8,
    CodecError,
    CompressedTensors,
    CompressionSettings,
    DeltaEncoder,
    EncodedTensor,
    decode_encoded,
    decode_tensor,
    dequantize_int8,
    encode_int8,
    encode_top_k,
    quantize_int8,
)
from murmur.gossip.receipts import no_audit_head
from murmur.gossip.spool import SpooledModel
from murmur.gossip.wire import (
    HTTP_STATUS,
    EnvelopeOpener,
    ModelUpdate,
    RejectReason,
    WireError,
    WireLimits,
    _encode_body,
    _seal_envelope,
    build_envelope,
)
from murmur.models.params import state_sha256

ALICE = generate_identity("alice")
BOB = generate_identity("bob")
ALLOWLIST = Allowlist(
    Peer(identity.name, f"http://127.0.0.1:{9000 + i}", identity.public_key)
    for i, identity in enumerate([ALICE, BOB])
)
NOW = 1_800_000_000.0
ALL = frozenset({"none", "int8", "topk_int8"})


def state(seed: int = 0, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": (scale * rng.standard_normal((64, 8, 3, 3))).astype(np.float32),
        "conv.bias": (scale * rng.standard_normal(16)).astype(np.float32),
        "head.weight": (scale * rng.standard_normal((1, 700))).astype(np.float32),
        "scalar": np.array(0.5, np.float32),
    }


SPEC = {name: (array.shape, "float32") for name, array in state().items()}


def opener(accepted=ALL, spool=None) -> EnvelopeOpener:
    return EnvelopeOpener(BOB, ALLOWLIST, SPEC, WireLimits(accepted_codecs=accepted), spool=spool)


def envelope(compressed: CompressedTensors, round_: int = 1) -> bytes:
    return build_envelope(
        ModelUpdate({}), ALICE, [BOB.public_key], round_, now=NOW, compressed=compressed
    )


def reason_of(data: bytes, receiver: EnvelopeOpener) -> RejectReason:
    with pytest.raises(WireError) as excinfo:
        receiver.open(data, now=NOW)
    return excinfo.value.reason


def part_bytes(encoded: EncodedTensor) -> memoryview:
    return memoryview(b"".join(p.view(np.uint8).tobytes() for p in encoded.parts))


# ---- the codecs ----------------------------------------------------------------------------


@pytest.mark.parametrize("block", [0, 1, 7, 256])
def test_int8_error_is_at_most_half_a_step_of_its_block(block):
    values = np.random.default_rng(1).standard_normal(1000).astype(np.float32) * 3
    scales, quantized = quantize_int8(values, block)
    decoded = dequantize_int8(scales, quantized, block)
    size = 1000 if block == 0 else block
    step = np.repeat(scales, size)[:1000]
    assert np.all(np.abs(decoded - values) <= step / 2 + 1e-6)
    assert quantized.min() >= -127 and quantized.max() <= 127
    assert len(scales) == (1 if block == 0 else -(-1000 // block))


def test_int8_of_zeros_is_exact():
    scales, quantized = quantize_int8(np.zeros(300, np.float32), 64)
    assert not dequantize_int8(scales, quantized, 64).any()


def test_top_k_keeps_the_largest_magnitudes():
    values = np.zeros(1000, np.float32)
    values[[3, 500, 999]] = [5.0, -7.0, 6.0]
    values[10] = 0.01
    encoded = encode_top_k(values, 0.003, 256)
    assert encoded.k == 3 and encoded.form == FORM_INDEX  # 12 index bytes < 125 bitmap bytes
    decoded = decode_encoded(encoded, 1000, 256)
    assert set(np.flatnonzero(decoded)) == {3, 500, 999}
    assert decoded[500] == pytest.approx(-7.0, abs=7 / 254)


def test_top_k_at_ten_percent_uses_a_bitmap():
    values = np.random.default_rng(2).standard_normal(4096).astype(np.float32)
    encoded = encode_top_k(values, 0.1, 256)
    assert encoded.form == FORM_BITMAP and encoded.k == 410
    decoded = decode_encoded(encoded, 4096, 256)
    kept = np.flatnonzero(decoded)
    threshold = np.sort(np.abs(values))[-410]
    assert len(kept) == 410 and np.all(np.abs(values[kept]) >= threshold)


def _corrupt(encoded: EncodedTensor, index: int, value) -> memoryview:
    """The encoded bytes with the first element of part ``index`` set to ``value``."""
    parts = [p.copy() for p in encoded.parts]
    parts[index].reshape(-1)[0] = value
    return memoryview(b"".join(p.view(np.uint8).tobytes() for p in parts))


@pytest.mark.parametrize(
    ("form", "part", "value", "reason"),
    [
        (FORM_INT8, 0, np.nan, "non_finite"),
        (FORM_INT8, 0, np.inf, "non_finite"),
        (FORM_INT8, 0, -1.0, "malformed"),
        (FORM_INT8, 0, 3e38, "malformed"),
        (FORM_INT8, 1, -128, "malformed"),
        (FORM_INDEX, 1, 1000, "malformed"),  # index out of range (n = 1000)
    ],
)
def test_decode_refuses_bad_scales_values_and_indices(form, part, value, reason):
    values = np.random.default_rng(3).standard_normal(1000).astype(np.float32)
    encoded = encode_int8(values, 64) if form == FORM_INT8 else encode_top_k(values, 0.01, 64)
    data = _corrupt(encoded, part, value)
    with pytest.raises(CodecError) as excinfo:
        decode_tensor(data, encoded.form, 1000, encoded.k, 64)
    assert excinfo.value.reason == reason


def test_decode_refuses_unsorted_or_repeated_indices_and_bad_bitmaps():
    values = np.random.default_rng(4).standard_normal(1000).astype(np.float32)
    encoded = encode_top_k(values, 0.01, 64)
    scales, indices, quantized = (p.copy() for p in encoded.parts)
    for bad in (indices[::-1].copy(), np.concatenate([indices[:1], indices[:-1]])):
        data = memoryview(scales.tobytes() + bad.astype("<u4").tobytes() + quantized.tobytes())
        with pytest.raises(CodecError, match="strictly increasing"):
            decode_tensor(data, FORM_INDEX, 1000, encoded.k, 64)
    odd = np.random.default_rng(5).standard_normal(1003).astype(np.float32)
    bitmap = encode_top_k(odd, 0.5, 64)  # 502 of 1003 entries: a 126-byte bitmap
    assert bitmap.form == FORM_BITMAP and bitmap.k == 502
    scales, bits, quantized = (p.copy() for p in bitmap.parts)
    padded = bits.copy()
    padded[-1] |= 0x80  # bit 1007 of a 1003-entry tensor
    with pytest.raises(CodecError, match="past the tensor's end"):
        decode_tensor(
            memoryview(scales.tobytes() + padded.tobytes() + quantized.tobytes()),
            FORM_BITMAP,
            1003,
            502,
            64,
        )
    with pytest.raises(CodecError, match="sets 502 bits, not 501"):
        decode_tensor(
            memoryview(scales.tobytes() + bits.tobytes() + quantized[:-1].tobytes()),
            FORM_BITMAP,
            1003,
            501,
            64,
        )
    with pytest.raises(CodecError, match="payload"):
        decode_tensor(part_bytes(bitmap)[:-1], FORM_BITMAP, 1003, 502, 64)


# ---- the sender's state and the wire -------------------------------------------------------


@pytest.mark.parametrize("spooled", [False, True])
@pytest.mark.parametrize("codec", ["int8", "topk_int8"])
def test_receiver_reconstructs_exactly_what_the_sender_holds(codec, spooled, tmp_path):
    encoder = DeltaEncoder(CompressionSettings(codec=codec, block=64, fraction=0.1))
    receiver = opener(spool=tmp_path if spooled else None)
    for r in range(1, 5):
        model = state(0) if r == 1 else {k: v + 0.01 * r for k, v in state(r).items()}
        message, held = encoder.encode(model)
        assert (message.base is None) == (r == 1)  # a keyframe first, deltas after
        opened = receiver.open(envelope(message, r), now=NOW)
        encoder.delivered(message, held, everyone=True)
        assert opened.state_id == message.state_id
        assert isinstance(opened.update.tensors, SpooledModel) == spooled
        assert receiver.bases[ALICE.public_key][1] is opened.update.tensors
        for name in SPEC:
            np.testing.assert_array_equal(opened.update.tensors[name], held[name])


def test_a_spooled_uncompressed_model_is_the_one_sent(tmp_path):
    model = state(4)
    data = build_envelope(ModelUpdate(model), ALICE, [BOB.public_key], 1, now=NOW)
    opened = opener(spool=tmp_path).open(data, now=NOW)
    assert isinstance(opened.update.tensors, SpooledModel)
    assert state_sha256(opened.update.tensors) == state_sha256(model)
    assert list(tmp_path.iterdir()) == []  # unlinked from the start


def test_error_feedback_delivers_what_top_k_dropped():
    """Sending one fixed model again and again, the receiver's copy converges to it: what one
    round's top-k left out is in the next delta."""
    encoder = DeltaEncoder(CompressionSettings(codec="topk_int8", block=64, fraction=0.1))
    target = state(7)
    message, held = encoder.encode({k: np.zeros_like(v) for k, v in target.items()})
    encoder.delivered(message, held, everyone=True)
    errors = []
    for _ in range(30):
        message, held = encoder.encode(target)
        encoder.delivered(message, held, everyone=True)
        errors.append(max(float(np.abs(held[k] - target[k]).max()) for k in target))
    assert errors[-1] < 0.02 * errors[0]


def test_a_receiver_that_missed_a_message_refuses_the_delta_then_takes_the_keyframe():
    encoder = DeltaEncoder(CompressionSettings(codec="topk_int8", block=64))
    receiver = opener()
    first, held = encoder.encode(state(0))
    receiver.open(envelope(first, 1), now=NOW)
    encoder.delivered(first, held, everyone=True)
    missed, held = encoder.encode(state(1))  # never reaches the receiver
    encoder.delivered(missed, held, everyone=True)  # ...though the sender thought it did
    delta, held = encoder.encode(state(2))
    assert reason_of(envelope(delta, 3), receiver) == RejectReason.UNKNOWN_BASE
    assert HTTP_STATUS[RejectReason.UNKNOWN_BASE] == 409
    encoder.delivered(delta, held, everyone=False)  # the refusal: next is a keyframe
    keyframe, held = encoder.encode(state(3))
    assert keyframe.base is None
    opened = receiver.open(envelope(keyframe, 4), now=NOW)
    np.testing.assert_array_equal(opened.update.tensors["conv.weight"], held["conv.weight"])


def test_a_restarted_receiver_holds_no_base():
    encoder = DeltaEncoder(CompressionSettings(codec="int8"))
    first, held = encoder.encode(state(0))
    opener().open(envelope(first, 1), now=NOW)
    encoder.delivered(first, held, everyone=True)
    delta, _ = encoder.encode(state(1))
    assert reason_of(envelope(delta, 2), opener()) == RejectReason.UNKNOWN_BASE


def test_the_receiver_decodes_only_the_codecs_it_accepts():
    message, _ = DeltaEncoder(CompressionSettings(codec="int8")).encode(state(0))
    refused = reason_of(envelope(message), opener(frozenset({"none", "topk_int8"})))
    assert refused == RejectReason.UNSUPPORTED_CODEC
    plain = build_envelope(ModelUpdate(state(0)), ALICE, [BOB.public_key], 1, now=NOW)
    assert reason_of(plain, opener(frozenset({"int8"}))) == RejectReason.UNSUPPORTED_CODEC
    assert opener(frozenset({"none"})).open(plain, now=NOW).state_id is None


def test_an_uncompressed_body_has_the_fields_it_always_had():
    body = _encode_body(ModelUpdate(state(0)))
    assert b"encoding" not in body[: 4 + int.from_bytes(body[:4], "big")]


def _sealed(compressed: CompressedTensors) -> bytes:
    head = no_audit_head()
    body = _encode_body(ModelUpdate({}), head, compressed)
    return _seal_envelope(body, ALICE, [BOB.public_key], 1, head_digest=head.digest(), now=NOW)


def test_a_keyframe_must_be_dense_int8_and_k_must_fit():
    encoder = DeltaEncoder(CompressionSettings(codec="topk_int8", block=64))
    keyframe, _ = encoder.encode(state(0))
    name = "head.weight"
    shape, _ = keyframe.tensors[name]
    sparse = encode_top_k(state(0)[name], 0.1, 64)
    as_topk = dataclasses.replace(keyframe, tensors={**keyframe.tensors, name: (shape, sparse)})
    assert reason_of(_sealed(as_topk), opener()) == RejectReason.MALFORMED
    dense = keyframe.tensors[name][1]
    short_k = dataclasses.replace(dense, k=dense.k - 1)
    bad_k = dataclasses.replace(keyframe, tensors={**keyframe.tensors, name: (shape, short_k)})
    assert reason_of(_sealed(bad_k), opener()) == RejectReason.MALFORMED


@pytest.mark.parametrize("spooled", [False, True])
def test_a_nan_scale_on_the_wire_is_non_finite_and_the_node_keeps_its_base(spooled, tmp_path):
    encoder = DeltaEncoder(CompressionSettings(codec="int8", block=64))
    receiver = opener(spool=tmp_path if spooled else None)
    first, held = encoder.encode(state(0))
    receiver.open(envelope(first, 1), now=NOW)
    encoder.delivered(first, held, everyone=True)
    delta, _ = encoder.encode(state(1))
    name = "conv.weight"
    shape, encoded = delta.tensors[name]
    scales = encoded.parts[0].copy()
    scales[0] = np.nan
    poisoned = dataclasses.replace(encoded, parts=(scales, encoded.parts[1]))
    bad = dataclasses.replace(delta, tensors={**delta.tensors, name: (shape, poisoned)})
    assert reason_of(_sealed(bad), receiver) == RejectReason.NON_FINITE
    assert receiver.bases[ALICE.public_key][0] == first.state_id
    base = receiver.bases[ALICE.public_key][1]
    np.testing.assert_array_equal(base["conv.weight"], held["conv.weight"])


def test_compressed_envelopes_are_much_smaller():
    rng = np.random.default_rng(5)
    model = {"w": rng.standard_normal((512, 512)).astype(np.float32)}
    plain = len(build_envelope(ModelUpdate(model), ALICE, [BOB.public_key], 1, now=NOW))
    sizes = {}
    for codec in ("int8", "topk_int8"):
        encoder = DeltaEncoder(CompressionSettings(codec=codec, block=256, fraction=0.1))
        first, held = encoder.encode(model)
        encoder.delivered(first, held, everyone=True)
        delta, _ = encoder.encode({"w": model["w"] + rng.standard_normal((512, 512), np.float32)})
        sizes[codec] = len(envelope(delta, 2))
    assert plain / sizes["int8"] >= 3.9
    assert plain / sizes["topk_int8"] >= 15


def test_top_k_warm_up_sends_denser_deltas_first_then_the_fraction():
    """The first `warmup` deltas keep fraction ** (j / (warmup + 1)) of each large tensor,
    later ones the fraction; a keyframe after a missed send does not restart the warm-up,
    and the receiver reconstructs every one of them exactly."""
    settings = CompressionSettings(codec="topk_int8", block=64, fraction=0.1, warmup=3)
    assert [round(settings.warmup_fraction(j), 3) for j in (1, 2, 3, 4, 9)] == [
        0.562,
        0.316,
        0.178,
        0.1,
        0.1,
    ]
    encoder, receiver = DeltaEncoder(settings), opener()
    n = SPEC["conv.weight"][0]
    n = int(np.prod(n))
    kept = []
    for r in range(1, 7):
        message, held = encoder.encode(state(r))
        opened = receiver.open(envelope(message, r), now=NOW)
        np.testing.assert_array_equal(opened.update.tensors["conv.weight"], held["conv.weight"])
        kept.append(message.tensors["conv.weight"][1].k / n)
        encoder.delivered(message, held, everyone=r != 4)  # round 4's send was not taken
    assert kept[0] == 1.0  # the keyframe
    assert kept[1:4] == pytest.approx([0.562, 0.316, 0.178], abs=1e-3)
    assert kept[4] == 1.0  # the keyframe after the missed send
    assert kept[5] == pytest.approx(0.1, abs=1e-3)  # the warm-up is not restarted
    with pytest.raises(ValueError, match="warm-up"):
        CompressionSettings(codec="topk_int8", warmup=-1)


def test_top_k_sends_small_tensors_dense_and_large_ones_sparse():
    encoder = DeltaEncoder(CompressionSettings(codec="topk_int8", block=64))
    first, held = encoder.encode(state(0))
    encoder.delivered(first, held, everyone=True)
    delta, _ = encoder.encode(state(1))
    forms = {name: encoded.form for name, (_, encoded) in delta.tensors.items()}
    assert forms["conv.weight"] == FORM_BITMAP  # 4,608 entries
    assert forms["head.weight"] == forms["conv.bias"] == forms["scalar"] == FORM_INT8


def test_a_network_of_nodes_shares_compressed_models_without_a_refusal(tmp_path):
    """Real HospitalNode round loops (bench/byzantine.py's in-process engine), run_cluster's
    configs with --compression: keyframes then deltas, every envelope accepted, and each
    node's copy of a neighbour's model is exactly what that neighbour's encoder holds."""
    import asyncio

    from murmur.node.audit.reading import records_of_kind

    import run_cluster
    from bench.byzantine import run_nodes_in_process, to_argv

    argv = to_argv(
        {
            "dataset": "medmnist",  # cnn_gn: two of its tensors are over DENSE_BELOW
            "nodes": 3,
            "rounds": 3,
            "local_steps": 2,
            "no_dp": True,
            "compression": "topk_int8",
            "round_timeout": 30.0,
            "no_baselines": True,
        }
    )
    report, nodes = asyncio.run(run_nodes_in_process(run_cluster.parse_args(argv), tmp_path))
    message, _ = nodes[0].rounds.sharing.encoder.encode(nodes[0].study.state())
    assert {encoded.form for _, encoded in message.tensors.values()} >= {FORM_BITMAP, FORM_INT8}
    assert report["rounds_completed"] == 3
    for node in nodes:
        assert dict(node.receiver.rejected) == {}
        assert node.config.compression.codec == "topk_int8"
    sender = nodes[0]
    base_id, held = sender.rounds.sharing.encoder.base
    sent = [r.fields for r in records_of_kind(sender.state_dir, "update_sent")]
    assert [s["keyframe"] for s in sent] == [True, False, False]
    received = {
        r.fields["model_sha256"]
        for r in records_of_kind(nodes[1].state_dir, "message_received")
        if r.fields["sender"] == sender.config.node.name
    }
    assert {s["received_model_sha256"] for s in sent} == received
    for receiver in nodes[1:]:
        state_id, tensors = receiver.opener.bases[sender.identity.public_key]
        assert state_id == base_id
        for name, array in tensors.items():
            np.testing.assert_array_equal(array, held[name])
