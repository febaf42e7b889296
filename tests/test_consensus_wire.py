"""`POST /consensus` messages (gossip/consensus_wire.py) and the node's step inbox
(node/consensus_net.py): what is sealed opens only for its recipient from its sender, and
every malformed, misaddressed, late, early or second message is refused with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from murmur.crypto.identity import generate_identity
from murmur.gossip import consensus as cs
from murmur.gossip.consensus_wire import (
    ConsensusMessage,
    ConsensusWireError,
    open_message,
    seal_message,
)
from murmur.models.params import model_spec, state_sha256
from murmur.node.consensus_net import ConsensusInbox

STUDY = "breast-cancer:logreg:seed0:rounds2"
MODEL = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float32)}
SPEC = model_spec(MODEL)
LIMIT = 1 << 20


def offer(owner) -> cs.Delivery:
    o = cs.FinalOffer(STUDY, owner.public_key, state_sha256(MODEL), '{"name":"a"}')
    return cs.Delivery(cs.SignedOffer(o, ()).endorsed(owner), MODEL)


def test_a_sealed_message_opens_for_its_recipient_with_everything_in_it() -> None:
    a, b = generate_identity("a"), generate_identity("b")
    d = offer(a).signed.endorsed(b)
    message = ConsensusMessage(
        STUDY, 2, (cs.Delivery(d, MODEL),), ((a.public_key, "ab" * 32, bytes(64)),), (b"share",)
    )
    got = open_message(b, a.public_key, seal_message(a, b.public_key, message, SPEC), SPEC, LIMIT)
    assert (got.study, got.step, got.agreed, got.shares) == (
        STUDY,
        2,
        message.agreed,
        message.shares,
    )
    (delivery,) = got.offers
    assert delivery.signed == d
    assert state_sha256(delivery.model) == state_sha256(MODEL)
    assert delivery.signed.signers(frozenset({a.public_key, b.public_key})) == (
        a.public_key,
        b.public_key,
    )


def test_a_message_does_not_open_for_another_recipient_or_from_another_sender() -> None:
    a, b, c = (generate_identity(x) for x in "abc")
    body = seal_message(a, b.public_key, ConsensusMessage(STUDY, 1, (offer(a),)), SPEC)
    for opener, sender in ((c, a.public_key), (b, c.public_key)):
        with pytest.raises(ConsensusWireError) as err:
            open_message(opener, sender, body, SPEC, LIMIT)
        assert err.value.why == "decrypt_failed"


@pytest.mark.parametrize(
    "body,why",
    [(b"\xc1garbage", "malformed"), (b"\x80", "malformed"), (bytes(LIMIT + 1), "too_large")],
)
def test_garbage_is_refused_with_a_reason(body: bytes, why: str) -> None:
    a, b = generate_identity("a"), generate_identity("b")
    with pytest.raises(ConsensusWireError) as err:
        open_message(b, a.public_key, body, SPEC, LIMIT)
    assert err.value.why == why


def test_a_model_of_the_wrong_shape_is_malformed() -> None:
    a, b = generate_identity("a"), generate_identity("b")
    wrong = {"w": np.zeros((3, 3), np.float32), "b": np.ones(2, np.float32)}
    o = cs.FinalOffer(STUDY, a.public_key, state_sha256(wrong))
    message = ConsensusMessage(STUDY, 1, (cs.Delivery(cs.SignedOffer(o, ()).endorsed(a), wrong),))
    body = seal_message(a, b.public_key, message, model_spec(wrong))
    with pytest.raises(ConsensusWireError, match="tensor 'w'"):
        open_message(b, a.public_key, body, SPEC, LIMIT)


def test_the_inbox_keeps_one_message_per_sender_and_step_within_one_step_ahead() -> None:
    inbox = ConsensusInbox(STUDY)
    s1, s2 = b"1" * 32, b"2" * 32
    assert inbox.take(s1, ConsensusMessage(STUDY, 1)) is None  # before the phase starts here
    assert inbox.take(s1, ConsensusMessage(STUDY, 1)) == "consensus_duplicate"
    assert inbox.take(s1, ConsensusMessage(STUDY, 2)) == "consensus_step_out_of_range"
    assert inbox.take(s1, ConsensusMessage("other", 1)) == "consensus_wrong_study"
    inbox.step, inbox.last = 1, 3
    assert inbox.take(s2, ConsensusMessage(STUDY, 2)) is None  # one step ahead: kept
    assert set(inbox.close(1)) == {s1}
    assert inbox.take(s2, ConsensusMessage(STUDY, 1)) == "consensus_late_step"
    assert inbox.take(s1, ConsensusMessage(STUDY, 4)) == "consensus_step_out_of_range"
    assert set(inbox.close(2)) == {s2}
    inbox.closed = True
    assert inbox.take(s1, ConsensusMessage(STUDY, 3)) == "consensus_closed"


def test_a_release_counts_the_consortium_members_and_takes_its_quorum(tmp_path) -> None:
    import types

    from murmur.gossip.membership import Manifest, Member
    from murmur.node.release import members_known, required_signatures

    ids = [generate_identity(f"hospital_{i}") for i in range(5)]
    members = tuple(Member(i.name, i.public_key, "http://127.0.0.1:9000") for i in ids)
    manifest = Manifest("c", members, quorum=4, created_at=1.0)
    for ident in ids:
        manifest = manifest.signed_by(ident)
    path = tmp_path / "manifest.bin"
    path.write_bytes(manifest.encode())
    config = types.SimpleNamespace(
        consortium=types.SimpleNamespace(enabled=True, manifest=path, consortium_id=""),
        aggregation=types.SimpleNamespace(rule="mean", f=0),
    )
    known, k = members_known(config, tmp_path)
    assert known == {i.public_key.hex(): i.name for i in ids}
    assert k == 4  # the consortium's quorum, not a majority of the file's list
    assert required_signatures(k, 0, None) == 4
    assert required_signatures(k, 2, None) == 2 and required_signatures(k, 2, 5) == 5


def test_config_check_wants_the_complete_graph_and_one_t_for_the_consensus_phase(
    tmp_path,
) -> None:
    from murmur.node.config_check import check_configs

    from tests.netutil import make_network

    net = make_network(tmp_path, "--nodes", "4", "--topology", "ring", "--consensus")
    paths = [n.config_path for n in net.nodes]
    _, findings = check_configs(paths)
    complete = [f for f in findings if f.where.endswith("consensus.enabled")]
    assert len(complete) == 4 and "does not list" in complete[0].message
    full = make_network(tmp_path / "complete", "--nodes", "3", "--consensus")
    full.edit_config("hospital_2", "consensus", max_byzantine=1)
    _, findings = check_configs([n.config_path for n in full.nodes])
    assert [f.where for f in findings] == ["consensus.max_byzantine"]
    full.edit_config("hospital_2", "consensus", enabled=False, max_byzantine=-1)
    _, findings = check_configs([n.config_path for n in full.nodes])
    assert [f.where for f in findings] == ["consensus.enabled"]
