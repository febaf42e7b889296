"""The consensus phase on the wire (`POST /consensus`): one message per sender, recipient and
step, sealed to the recipient. Pure: no I/O, no clock.

What protects a message, and where:

* **Who sent it, to whom, just now, once**: the request's `Murmur-Auth` header
  (gossip/auth.py), checked by the peer listener before the body is read: an admitted sender,
  this node as recipient, a fresh timestamp and an unused nonce, the body's SHA-256.
* **Encrypted and bound to both ends**: the plaintext is sealed with crypto/sealing.py for the
  one recipient, the key wrapped by the sender's static key, with associated data naming the
  domain, sender and recipient; a body copied from another pair does not open.
* **One message per step**: the receiver keeps one slot per (sender, step) and refuses a
  second (`consensus_duplicate`), so a replay under a fresh header adds nothing.
* **The protocol's own signatures**: every offer carries its Dolev-Strong signature chain
  and every agreed-hash signature and pooled share is signed by its member
  (gossip/consensus.py, node/pooled.py); a relaying neighbour cannot alter them.

Plaintext: msgpack ``{"v", "study", "step", "offers", "agreed", "shares"}``. ``offers``: a
list of ``{"owner", "model_sha256", "facts", "signatures": [[key, sig], ...], "model":
[tensor bytes in the receiver's spec order]}``; ``agreed``: ``[[key, model_sha256, sig]]``;
``shares``: signed pooled-evaluation shares (node/pooled.py's encoding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import msgpack
import numpy as np
from murmur.crypto.identity import Identity
from murmur.crypto.sealing import (
    SEALED_FIELDS,
    SealedFieldsError,
    SealingError,
    seal_to_fields,
    unseal_fields,
)
from murmur.gossip.consensus import Delivery, FinalOffer, SignedOffer

CONSENSUS_PATH = "/consensus"
WIRE_VERSION = 1
AD_DOMAIN = b"murmur-consensus-v1\x00"
MAX_SIGNATURES = 256
MAX_FACTS_BYTES = 4096
_FIXED_BYTES = 64 * 1024  # headers, hashes, signatures, facts, shares' framing

State = dict[str, np.ndarray]
Spec = dict[str, tuple[tuple[int, ...], str]]


class ConsensusWireError(ValueError):
    """A consensus message refused; ``why`` is the reason code (``consensus_<why>``)."""

    def __init__(self, why: str, detail: str) -> None:
        super().__init__(f"{why}: {detail}")
        self.why = why


@dataclass(frozen=True)
class ConsensusMessage:
    """What one member sends one neighbour at one step of the phase."""

    study: str
    step: int
    offers: tuple[Delivery, ...] = ()
    agreed: tuple[tuple[bytes, str, bytes], ...] = ()
    shares: tuple[bytes, ...] = field(default=())


def max_message_bytes(spec: Spec, members: int, share_bytes: int) -> int:
    """The largest message an honest member sends: at most two offers per member (the
    second proves equivocation), each with a model, plus every member's signature and
    share."""
    model = sum(math.prod(s) * np.dtype(d).itemsize for s, d in spec.values())
    per_offer = model + 64 * len(spec) + MAX_FACTS_BYTES + 100 * members + 256
    return 2 * members * per_offer + members * (share_bytes + 200) + _FIXED_BYTES


def _associated(sender: bytes, recipient: bytes) -> bytes:
    return AD_DOMAIN + sender + recipient


def _encode_offer(d: Delivery, spec: Spec) -> dict:
    o = d.signed.offer
    return {
        "owner": o.owner,
        "model_sha256": o.model_sha256,
        "facts": o.facts,
        "signatures": [[k, s] for k, s in d.signed.signatures],
        "model": [np.ascontiguousarray(d.model[name], dtype="<f4").tobytes() for name in spec],
    }


def seal_message(
    sender: Identity, recipient: bytes, message: ConsensusMessage, spec: Spec
) -> bytes:
    """The body of one `POST /consensus`: ``message`` sealed to ``recipient``."""
    plaintext = msgpack.packb(
        {
            "v": WIRE_VERSION,
            "study": message.study,
            "step": message.step,
            "offers": [_encode_offer(d, spec) for d in message.offers],
            "agreed": [list(a) for a in message.agreed],
            "shares": list(message.shares),
        },
        use_bin_type=True,
    )
    sealed = seal_to_fields(plaintext, sender, recipient, _associated(sender.public_key, recipient))
    return msgpack.packb({"v": WIRE_VERSION, **sealed}, use_bin_type=True)


_OUTER = {"v", *SEALED_FIELDS}


def _unpack(data: bytes, limit: int) -> object:
    try:
        return msgpack.unpackb(data, raw=False, max_bin_len=limit, max_str_len=limit)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise ConsensusWireError("malformed", f"not msgpack ({type(exc).__name__})") from None


def open_message(
    identity: Identity, sender: bytes, body: bytes, spec: Spec, limit: int
) -> ConsensusMessage:
    """The message in a `POST /consensus` body from the authenticated ``sender``, or
    `ConsensusWireError` (too_large, malformed, unsupported_version, decrypt_failed)."""
    if len(body) > limit:
        raise ConsensusWireError("too_large", f"{len(body)} bytes > {limit}")
    outer = _unpack(body, limit)
    if not isinstance(outer, dict) or set(outer) != _OUTER:
        raise ConsensusWireError("malformed", f"the sealed message is a map of {sorted(_OUTER)}")
    if outer["v"] != WIRE_VERSION:
        raise ConsensusWireError("unsupported_version", f"version {outer['v']!r}")
    try:
        plaintext = unseal_fields(identity, sender, outer, _associated(sender, identity.public_key))
    except SealedFieldsError as exc:
        raise ConsensusWireError("malformed", str(exc)) from None
    except SealingError as exc:
        raise ConsensusWireError("decrypt_failed", str(exc)) from None
    return _parse(_unpack(plaintext, limit), spec)


def _parse(obj: object, spec: Spec) -> ConsensusMessage:
    keys = {"v", "study", "step", "offers", "agreed", "shares"}
    if not isinstance(obj, dict) or set(obj) != keys:
        raise ConsensusWireError("malformed", f"a consensus message is a map of {sorted(keys)}")
    if obj["v"] != WIRE_VERSION:
        raise ConsensusWireError("unsupported_version", f"version {obj['v']!r}")
    if not isinstance(obj["study"], str) or type(obj["step"]) is not int or obj["step"] < 1:
        raise ConsensusWireError("malformed", "study is a string and step a positive integer")
    for name in ("offers", "agreed", "shares"):
        if not isinstance(obj[name], list):
            raise ConsensusWireError("malformed", f"'{name}' must be a list")
    offers = tuple(_parse_offer(o, obj["study"], spec) for o in obj["offers"])
    agreed = []
    for a in obj["agreed"]:
        ok = (
            isinstance(a, list)
            and len(a) == 3
            and type(a[0]) is bytes
            and len(a[0]) == 32
            and isinstance(a[1], str)
            and type(a[2]) is bytes
            and len(a[2]) == 64
        )
        if not ok:
            raise ConsensusWireError("malformed", "an agreed signature is [key, hash, signature]")
        agreed.append((a[0], a[1], a[2]))
    if not all(type(s) is bytes for s in obj["shares"]):
        raise ConsensusWireError("malformed", "shares are bin objects")
    return ConsensusMessage(obj["study"], obj["step"], offers, tuple(agreed), tuple(obj["shares"]))


def _parse_offer(o: object, study: str, spec: Spec) -> Delivery:
    keys = {"owner", "model_sha256", "facts", "signatures", "model"}
    if not isinstance(o, dict) or set(o) != keys:
        raise ConsensusWireError("malformed", f"an offer is a map of {sorted(keys)}")
    if type(o["owner"]) is not bytes or len(o["owner"]) != 32:
        raise ConsensusWireError("malformed", "an offer's owner is a 32-byte key")
    if not isinstance(o["model_sha256"], str) or not isinstance(o["facts"], str):
        raise ConsensusWireError("malformed", "model_sha256 and facts are strings")
    if len(o["facts"].encode()) > MAX_FACTS_BYTES:
        raise ConsensusWireError("malformed", f"facts longer than {MAX_FACTS_BYTES} bytes")
    sigs = o["signatures"]
    if not isinstance(sigs, list) or len(sigs) > MAX_SIGNATURES:
        raise ConsensusWireError("malformed", f"at most {MAX_SIGNATURES} signatures")
    chain = []
    for pair in sigs:
        if not (isinstance(pair, list) and len(pair) == 2 and all(type(x) is bytes for x in pair)):
            raise ConsensusWireError("malformed", "a signature is [key, signature]")
        chain.append((pair[0], pair[1]))
    tensors = o["model"]
    if not isinstance(tensors, list) or len(tensors) != len(spec):
        raise ConsensusWireError("malformed", f"an offer's model has {len(spec)} tensors")
    model: State = {}
    for raw, (name, (shape, _dtype)) in zip(tensors, spec.items(), strict=True):
        if type(raw) is not bytes or len(raw) != 4 * math.prod(shape):
            raise ConsensusWireError("malformed", f"tensor {name!r} is not {shape} float32")
        model[name] = np.frombuffer(raw, dtype="<f4").reshape(shape).copy()
    offer = FinalOffer(study, o["owner"], o["model_sha256"], o["facts"])
    return Delivery(SignedOffer(offer, tuple(chain)), model)
