"""The pooled evaluation over the wire (node/pooled.py): the pooled AUROC equals
scikit-learn's on the pooled scores, a dropped hospital is tolerated, bad shares are refused
with a reason, and no hospital's per-patient score is visible in any message or log line.
The last check fails as soon as a score travels outside the histogram path (the control)."""

from __future__ import annotations

import json
import logging
import struct

import msgpack
import numpy as np
import pytest
from murmur.crypto.identity import generate_identity
from murmur.models import pooled_eval as pe
from murmur.node import pooled
from sklearn.metrics import roc_auc_score

SPEC = pe.BinSpec()


def consortium(n: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        size = 60 + 40 * i
        y = (rng.random(size) < 0.4).astype(np.int64)
        p = 1.0 / (1.0 + np.exp(-rng.normal(1.2 * y - 0.5, 1.0)))
        out.append((f"hospital_{i}", generate_identity(f"hospital_{i}"), y, p))
    keys = [h[1].public_key for h in out]
    partners = {k: [o for o in keys if o != k] for k in keys}
    return out, partners


def scores_visible(blobs: list[bytes], text: str, scores: np.ndarray) -> list[float]:
    """The scores that appear in any blob (as float64 bytes, either byte order) or in the
    text (full repr or 8 decimals)."""
    joined = b"".join(blobs)
    found = []
    for s in np.asarray(scores, dtype=np.float64):
        forms = (struct.pack("<d", s), struct.pack(">d", s))
        if any(f in joined for f in forms) or repr(float(s)) in text or f"{s:.8f}" in text:
            found.append(float(s))
    return found


def test_no_score_is_visible_in_any_message_or_log_line(caplog):
    hospitals, partners = consortium()
    session = pooled.session_label("study", "ab" * 32)
    with caplog.at_level(logging.DEBUG):
        outcome = pooled.pooled_in_memory(hospitals, partners, session, SPEC)
    text = caplog.text + json.dumps(outcome.report)
    assert len(outcome.messages) == len(hospitals)
    for _, _, _, p in hospitals:
        assert scores_visible(outcome.messages, text, p) == []
    # the control: one share that bypasses the histogram (raw scores) is caught
    leaked = msgpack.packb({"scores": [float(x) for x in hospitals[0][3]]})
    assert len(scores_visible([*outcome.messages, leaked], text, hospitals[0][3])) == len(
        hospitals[0][3]
    )


def test_pooled_auroc_over_the_wire_equals_sklearn_on_the_pooled_scores():
    hospitals, partners = consortium(seed=3)
    outcome = pooled.pooled_in_memory(hospitals, partners, pooled.session_label("s", "h"), SPEC)
    y = np.concatenate([h[2] for h in hospitals])
    p = np.concatenate([h[3] for h in hospitals])
    assert abs(outcome.report["pooled"]["auroc"]["value"] - roc_auc_score(y, p)) <= 0.002
    assert outcome.report["pooled"]["n"] == len(y)
    for name, _, yh, ph in hospitals:  # each hospital's own figure beside the pooled one
        own = outcome.report["hospitals"][name]["auroc"]["value"]
        assert abs(own - roc_auc_score(yh, ph)) <= 0.002


def test_a_dropped_hospital_leaves_the_others_pooled_exactly():
    hospitals, partners = consortium(n=5, seed=4)
    outcome = pooled.pooled_in_memory(
        hospitals, partners, pooled.session_label("s", "h"), SPEC, dropped=frozenset({"hospital_2"})
    )
    kept = [h for h in hospitals if h[0] != "hospital_2"]
    y = np.concatenate([h[2] for h in kept])
    p = np.concatenate([h[3] for h in kept])
    assert outcome.report["pooled"]["n"] == len(y)
    assert abs(outcome.report["pooled"]["auroc"]["value"] - roc_auc_score(y, p)) <= 0.002
    assert outcome.report["dropped"] == ["hospital_2"]


def test_bad_shares_are_refused_with_a_reason_code():
    hospitals, partners = consortium(n=3)
    _, ident, y, p = hospitals[0]
    members = frozenset(partners)
    session = pooled.session_label("s", "h")
    length = pe.vector_length(SPEC)
    share, _ = pooled.hospital_share(ident, partners[ident.public_key], session, y, p, SPEC)
    assert pooled.decode_share(share, session, members, length)[0] == ident.public_key
    cases = {
        "bad_signature": share[:-1] + bytes([share[-1] ^ 1]),
        "wrong_session": share,
        "too_large": share + b"x" * (8 * length),
        "malformed": b"\xc1" + share[1:],
    }
    for why, data in cases.items():
        other = pooled.session_label("s", "other") if why == "wrong_session" else session
        with pytest.raises(pooled.PooledError) as info:
            pooled.decode_share(data, other, members, length)
        assert info.value.why == why
    outsider = generate_identity("outsider")
    foreign = pooled.encode_share(outsider, session, np.zeros(length, dtype=np.uint64))
    with pytest.raises(pooled.PooledError) as info:
        pooled.decode_share(foreign, session, members, length)
    assert info.value.why == "unknown_sender"
