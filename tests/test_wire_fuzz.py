"""Property-based fuzzing of EnvelopeOpener.open: only WireError, never another exception.

Four generators, 2,600 examples in all, derandomized so CI sees the same inputs every run:
random bytes, mutated valid envelopes, well-formed msgpack with wrong types (whole envelopes
and single fields), and correctly signed and encrypted envelopes around hostile bodies (the
part of the decoder only an admitted peer can reach).
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from murmur.gossip.wire import ENVELOPE_FIELDS, OpenedEnvelope, WireError, _encode_body

from tests.test_wire import (
    NOW,
    envelope_with_body,
    join_body,
    opener,
    small_update,
    split_body,
    valid_envelope,
)

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
VALID = valid_envelope()
VALID_FIELDS = msgpack.unpackb(VALID)
VALID_HEADER, VALID_DATA = split_body(_encode_body(small_update()))

# Anything msgpack can carry: the wrong types for every field.
msgpack_integers = st.integers(min_value=-(2**63), max_value=2**64 - 1)
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | msgpack_integers
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=80),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=10) | msgpack_integers, children, max_size=5)
    ),
    max_leaves=12,
)


def open_only_wire_errors(data: object) -> OpenedEnvelope | None:
    """Open ``data`` with a fresh opener; any exception but WireError fails the test."""
    try:
        return opener().open(data, now=NOW)
    except WireError as error:
        assert error.detail and error.http_status >= 400
        return None


@pytest.mark.timeout(60)
@settings(FUZZ, max_examples=700)
@given(st.binary(max_size=2048))
def test_random_bytes(data):
    assert open_only_wire_errors(data) is None


@st.composite
def mutated_envelopes(draw) -> bytes:
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "splice"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "flip" and data:
            data[position] ^= draw(st.integers(1, 255))
        elif action == "set" and data:
            data[position] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xC1, 0xCF, 0xDC, 0xFF]))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        elif action == "delete":
            del data[position : position + draw(st.integers(1, 16))]
        elif action == "truncate":
            del data[position:]
        elif action == "splice":
            start = draw(st.integers(0, len(VALID) - 1))
            data[position:position] = VALID[start : start + draw(st.integers(1, 64))]
    return bytes(data)


@pytest.mark.timeout(60)
@settings(FUZZ, max_examples=800)
@given(mutated_envelopes())
def test_mutated_valid_envelopes(data):
    assume(data != VALID)
    assert open_only_wire_errors(data) is None


@pytest.mark.timeout(60)
@settings(FUZZ, max_examples=300)
@given(msgpack_values)
def test_well_formed_msgpack_of_any_shape(value):
    assert open_only_wire_errors(msgpack.packb(value)) is None


@pytest.mark.timeout(60)
@settings(FUZZ, max_examples=400)
@given(st.sampled_from(ENVELOPE_FIELDS), msgpack_values, st.booleans())
def test_envelope_fields_with_wrong_types(field_name, value, drop):
    fields = dict(VALID_FIELDS)
    if drop:
        del fields[field_name]
    else:
        assume(fields[field_name] != value)
        fields[field_name] = value
    assert open_only_wire_errors(msgpack.packb(fields)) is None


@st.composite
def hostile_bodies(draw) -> bytes:
    """Body plaintexts an admitted but buggy or malicious peer could sign and encrypt."""
    kind = draw(st.sampled_from(["bytes", "any", "field", "tensor", "data"]))
    if kind == "bytes":
        return draw(st.binary(max_size=512))
    if kind == "any":
        return join_body(draw(msgpack_values), draw(st.binary(max_size=256)))
    header = {**VALID_HEADER, "tensors": [list(t) for t in VALID_HEADER["tensors"]]}
    data = VALID_DATA
    if kind == "field":
        header[draw(st.sampled_from(list(header)))] = draw(msgpack_values)
    elif kind == "tensor":
        tensor = header["tensors"][draw(st.integers(0, len(header["tensors"]) - 1))]
        tensor[draw(st.integers(0, 2))] = draw(msgpack_values)
    else:
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + draw(st.binary(max_size=64))
    return join_body(header, data)


@pytest.mark.timeout(60)
@settings(FUZZ, max_examples=400)
@given(hostile_bodies())
def test_signed_envelopes_with_hostile_bodies(body):
    opened = open_only_wire_errors(envelope_with_body(body))
    if opened is not None:  # only a body that really matches the model may pass
        assert [list(a.shape) for a in opened.update.tensors.values()] == [
            t[2] for t in VALID_HEADER["tensors"]
        ]
