"""The consensus phase for a network of nodes, and what it leaves in each state directory.

Why a part of its own: gossip/consensus.py is the pure protocol; this module feeds it a node's
final model, identity and signed card entry (`facts_of`), runs it between nodes, and writes the
outcome where `murmur model show` and `murmur model release` read it (node/release.py):

    <state_dir>/agreed/model.safetensors   the agreed model (tensor order in its metadata)
    <state_dir>/agreed/agreement.json      hash, rule, included and excluded members with why,
                                           each member's signed card entry, the signatures on
                                           the hash, the steps taken, the pooled evaluation

`read_agreement` re-checks everything it reads: the model file must hash to the agreed hash and
every listed signature must verify; a file that does not is refused with the reason.

Two drivers: `run_phase` runs it between nodes in one process (bench/release.py and the
tests, with the nodes' real keys and final models); node/consensus_net.py runs it between
node processes over `POST /consensus`. node/release.py (`murmur model show|release`) reads
what either wrote.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from murmur.gossip import consensus as cs
from murmur.gossip.consensus_attacks import ConsensusAttacker
from murmur.models.params import state_sha256

AGREED_DIR = "agreed"
MODEL_FILE = "model.safetensors"
AGREEMENT_FILE = "agreement.json"
FINAL_RULE = cs.CENTRED_MEAN  # see gossip/consensus.py, centred_mean

State = dict[str, np.ndarray]


class AgreementError(ValueError):
    """An agreement directory that does not check out."""


def study_label(config: Any) -> str:
    """What every member's offers and signatures are bound to (no replay across studies)."""
    return (
        f"{config.data.dataset}:{config.model.name}:seed{config.training.seed}:"
        f"rounds{config.training.rounds}"
    )


def facts_of(node: Any) -> str:
    """A member's card entry, signed in its offer: who, how many patients, what privacy cost
    its ledger records (canonical JSON)."""
    privacy = node.study.privacy_status()
    ledger = node.study.ledger
    data = node.study.describe_data()
    return json.dumps(
        {
            "name": node.config.node.name,
            "hospital": data["hospital"],
            "dataset": data["dataset"],
            "n_train": data["n_train"],
            "n_test": data["n_test"],
            "dp": bool(privacy.get("enabled")),
            "epsilon": float(privacy.get("epsilon_spent", 0.0)),
            "delta": float(ledger.delta) if ledger is not None else None,
        },
        sort_keys=True,
        separators=(",", ":"),
    )


@dataclass(frozen=True)
class PhaseRun:
    result: cs.PhaseResult
    names: dict[bytes, str]
    steps: int
    signature_steps: int


def run_phase(
    nodes: Sequence[Any],
    neighbours: Mapping[str, Sequence[str]],
    graph: Any,
    *,
    t: int,
    f: int,
    attacks: Mapping[str, str] | None = None,
) -> PhaseRun:
    """The phase between ``nodes`` (HospitalNode objects after their last round) over the
    graph; ``attacks``: node name -> consensus attack for the Byzantine ones."""
    attacks = attacks or {}
    steps, signature_steps = cs.steps_needed(graph, t)
    key_of = {n.config.node.name: n.identity.public_key for n in nodes}
    members = frozenset(key_of.values())
    study = study_label(nodes[0].config)
    parties: dict[bytes, Any] = {}
    nbrs = {key_of[name]: [key_of[o] for o in others] for name, others in neighbours.items()}
    for node in nodes:
        name, key = node.config.node.name, node.identity.public_key
        final = node.study.state()
        if name in attacks:
            parties[key] = ConsensusAttacker(
                node.identity, attacks[name], study, final, nbrs[key], steps
            )
        else:
            party = cs.ConsensusParty(
                node.identity, members, study, final, steps, FINAL_RULE, f, facts=facts_of(node)
            )
            parties[key] = cs.Member(party)
    result = cs.run_in_memory(parties, nbrs, steps, signature_steps)
    return PhaseRun(result, {v: k for k, v in key_of.items()}, steps, signature_steps)


def write_agreement(
    state_dir: Path,
    decision: cs.Decision,
    flood: cs.SignatureFlood,
    names: Mapping[bytes, str],
    *,
    steps: int,
    pooled: Mapping[str, Any] | None = None,
    round_: int | None = None,
) -> Path:
    """The agreed model and its agreement, under ``state_dir``/agreed."""
    from safetensors.numpy import save_file

    out = Path(state_dir) / AGREED_DIR
    out.mkdir(parents=True, exist_ok=True)
    order = list(decision.model)
    save_file(
        {k: np.ascontiguousarray(v) for k, v in decision.model.items()},
        str(out / MODEL_FILE),
        metadata={"order": json.dumps(order), "model_sha256": decision.model_sha256},
    )
    doc = {
        "study": flood.study,
        "model_sha256": decision.model_sha256,
        "rule": FINAL_RULE,
        "members": {k.hex(): names.get(k, "?") for k in sorted(flood.members)},
        "included": [
            {"key": k.hex(), "name": names.get(k, "?"), "facts": json.loads(decision.facts[k])}
            for k in decision.included
        ],
        "excluded": [
            {"key": k.hex(), "name": names.get(k, "?"), "why": why}
            for k, why in decision.excluded.items()
        ],
        "equivocation_proofs": len(decision.evidence),
        "signatures": [
            {"key": k.hex(), "name": names.get(k, "?"), "signature": s.hex()}
            for k, s in sorted(flood.signatures.items())
        ],
        "dissent": {names.get(k, k.hex()): h for k, h in flood.dissent.items()},
        "extra_rounds": steps,
        "round": round_,  # the last training round before the phase
        "pooled_evaluation": dict(pooled) if pooled is not None else None,
    }
    (out / AGREEMENT_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True))
    return out


def agreement_written(state_dir: Path) -> bool:
    return (Path(state_dir) / AGREED_DIR / AGREEMENT_FILE).is_file()


def load_agreed_model(state_dir: Path) -> State:
    from safetensors import safe_open

    path = Path(state_dir) / AGREED_DIR / MODEL_FILE
    if not path.is_file():
        raise AgreementError(f"no agreed model at {path}: the consensus phase has not run here")
    with safe_open(str(path), framework="numpy") as handle:
        order = json.loads((handle.metadata() or {}).get("order", "[]"))
        if sorted(order) != sorted(handle.keys()):
            raise AgreementError(f"{path}: its tensor order does not name its tensors")
        return {k: handle.get_tensor(k) for k in order}


def read_agreement(state_dir: Path) -> dict[str, Any]:
    """The agreement, checked: the model file hashes to the agreed hash and every signature
    verifies. Adds ``valid_signers`` (names) to what it returns."""
    path = Path(state_dir) / AGREED_DIR / AGREEMENT_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise AgreementError(
            f"no agreement at {path}: the consensus phase has not run here"
        ) from None
    except json.JSONDecodeError as exc:
        raise AgreementError(f"{path} is not JSON: {exc}") from None
    model = load_agreed_model(state_dir)
    if state_sha256(model) != doc["model_sha256"]:
        raise AgreementError(
            f"the agreed model file hashes to {state_sha256(model)}, not {doc['model_sha256']}"
        )
    members = set(doc["members"])
    valid = []
    for entry in doc["signatures"]:
        ok = entry["key"] in members and cs.check_agreed_signature(
            bytes.fromhex(entry["key"]),
            doc["study"],
            doc["model_sha256"],
            bytes.fromhex(entry["signature"]),
        )
        if not ok:
            raise AgreementError(f"the signature listed for {entry['name']} does not verify")
        valid.append(entry["name"])
    doc["valid_signers"] = valid
    return doc
