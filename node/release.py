"""`murmur model show` and `murmur model release`: the agreed model leaves the consortium.

`release` runs at one hospital, with its node config (its key, its data, its members) and the
state directory its node wrote `agreed/` to. It refuses, with the reason, unless:

1. the agreement checks out (node/consensus.py `read_agreement`: the model file hashes to the
   agreed hash, every listed signature verifies);
2. at least k members signed the agreed hash, counting only keys this hospital knows as
   members (the consortium's current membership, or its own key and its allowlist's; the
   file's own member list is not trusted); k is `--min-signatures`, else `[consensus]
   min_signatures`, else the consortium's quorum, or a majority of the allowlist's members;
3. the membership-inference audit (models/membership_audit.py) of the agreed model on this
   hospital's own training (members) and test (non-members) rows passes: attack AUC at most
   `--max-attack-auc` (default `MAX_ATTACK_AUC`, 0.60).

It then writes, under the output directory: `model.safetensors` (the agreed model, as
agreed), `model.pt2` (a `torch.export` program) where the model exports, `membership_audit.json`,
`model_card.json` and `model_card.md`. A refused release writes the audit (so the operator
sees why) and nothing else.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from murmur.models.membership_audit import MAX_ATTACK_AUC, MembershipAudit, audit_model
from murmur.node.consensus import (
    AGREED_DIR,
    AGREEMENT_FILE,
    MODEL_FILE,
    load_agreed_model,
    read_agreement,
)

EXPORT_FILE = "model.pt2"


class ReleaseRefused(ValueError):
    """The gate refused the release; the message says which condition failed."""


def _pct(figure: dict | None) -> str:
    if not figure:
        return "n/a"
    return f"{figure['value']:.3f} (95% CI {figure['low']:.3f}-{figure['high']:.3f})"


def show_text(state_dir: Path) -> str:
    """`murmur model show`: hash, signers, round, pooled figures, privacy spent per site.
    ``state_dir`` is a node's state directory or its `agreed/` directory."""
    if (Path(state_dir) / AGREEMENT_FILE).is_file():
        state_dir = Path(state_dir).parent
    doc = read_agreement(state_dir)
    lines = [
        f"agreed model {doc['model_sha256']}",
        f"study {doc['study']}; last training round {doc.get('round')}; rule {doc['rule']} "
        f"over {len(doc['included'])} final models; {doc['extra_rounds']} extra rounds",
        f"signed by {len(doc['valid_signers'])} of {len(doc['members'])} members "
        "(every signature verified):",
        *(f"  {s['name']}  {s['key'][:16]}…  {s['signature'][:24]}…" for s in doc["signatures"]),
        "privacy spent (each hospital's signed card entry):",
        *(
            f"  {e['name']}: ε {e['facts'].get('epsilon', 0.0):.3f}, δ {e['facts'].get('delta')}"
            f"{'' if e['facts'].get('dp') else ' (no DP)'}; {e['facts'].get('n_train')} train / "
            f"{e['facts'].get('n_test')} test patients"
            for e in doc["included"]
        ),
    ]
    if doc["excluded"]:
        lines.append("left out:")
        lines += [f"  {e['name']}: {e['why']}" for e in doc["excluded"]]
    lines += _pooled_lines(doc.get("pooled_evaluation"))
    return "\n".join(lines)


def _pooled_lines(pooled: dict | None) -> list[str]:
    if not pooled:
        return ["pooled evaluation: not run"]
    if not pooled.get("computed"):
        return [f"pooled evaluation: not computed ({pooled.get('why')})"]
    p = pooled["pooled"]
    auroc = p["auroc"]
    return [
        f"pooled evaluation over {p['n']} test patients ({p['positives']} positive):",
        f"  AUROC {_pct(auroc)}" if auroc else "  AUROC n/a",
        f"  at threshold {p['threshold']}: sensitivity {_pct(p['sensitivity'])}, "
        f"specificity {_pct(p['specificity'])}",
        f"  PPV {_pct(p['ppv'])}, NPV {_pct(p['npv'])}, Brier {_pct(p['brier'])}",
    ]


def members_known(config: Any, state_dir: Path) -> tuple[dict[str, str], int]:
    """(key hex -> name, default k) of the members this hospital itself knows: with a
    consortium its current membership (from the manifest and the node's change log) and the
    consortium's quorum; else its own key and its allowlist's, and a majority of them."""
    from murmur.crypto.identity import load_identity, load_public_key

    if config.consortium.enabled:
        from murmur.node.consortium import open_governance

        # a process of [[studies]] keeps the hospital's one log at its state root
        root = getattr(config, "studies_root", None) or Path(state_dir)
        governance = open_governance(config, root)
        try:
            membership = governance.membership
            known = {m.public_key.hex(): m.name for m in membership.members}
            return known, membership.quorum
        finally:
            governance.store.close()
    known = {load_identity(config.node.key_file).public_key.hex(): config.node.name}
    for p in config.peers:
        known[load_public_key(p.public_key or str(p.public_key_file)).hex()] = p.name
    return known, len(known) // 2 + 1


def required_signatures(default_k: int, config_k: int, override: int | None) -> int:
    """k: ``--min-signatures``, else `[consensus] min_signatures`, else the default."""
    if override is not None:
        return override
    return config_k if config_k > 0 else default_k


def run_audit(config: Any, state_dir: Path, max_auc: float) -> MembershipAudit:
    """The audit of the agreed model on this hospital's own rows."""
    from murmur.models.params import set_state
    from murmur.node.study import Study, load_own_data

    data = load_own_data(config)
    study = Study(config, data)
    set_state(study.model, load_agreed_model(state_dir))
    return audit_model(study.model, data.x_train, data.y_train, data.x_test, data.y_test, max_auc)


def model_card(
    doc: dict[str, Any], audit: MembershipAudit, signers: list[str], k: int, config: Any
) -> dict[str, Any]:
    """Everything the card says, as JSON."""
    return {
        "model_sha256": doc["model_sha256"],
        "study": doc["study"],
        "model": config.model.name,
        "task": "binary classification",
        "last_training_round": doc.get("round"),
        "aggregation": {
            "final_rule": doc["rule"],
            "training_rule": config.aggregation.rule,
            "f": config.aggregation.f,
            "consensus_extra_rounds": doc["extra_rounds"],
        },
        "hospitals": [{"name": e["name"], **e["facts"]} for e in doc["included"]],
        "byzantine_exclusions": doc["excluded"],
        "pooled_evaluation": doc.get("pooled_evaluation"),
        "signatures": {
            "required": k,
            "members": len(doc["members"]),
            "valid_from_known_members": signers,
            "entries": doc["signatures"],
        },
        "membership_audit": audit.as_dict(),
        "released_by": config.node.name,
    }


def card_markdown(card: dict[str, Any]) -> str:
    """The card for people."""
    audit = card["membership_audit"]
    rows = [
        "| hospital | data set | train | test | DP | ε spent | δ |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {h['name']} | {h.get('dataset')} | {h.get('n_train')} | {h.get('n_test')} | "
            f"{'yes' if h.get('dp') else 'no'} | {h.get('epsilon', 0.0):.3f} | {h.get('delta')} |"
            for h in card["hospitals"]
        ),
    ]
    excluded = card["byzantine_exclusions"]
    sig = card["signatures"]
    parts = [
        f"# Model card: {card['study']}",
        "",
        f"- model hash (SHA-256 of the state): `{card['model_sha256']}`",
        f"- model: {card['model']}, {card['task']}; last training round "
        f"{card['last_training_round']}",
        f"- aggregation: training rule {card['aggregation']['training_rule']} (f = "
        f"{card['aggregation']['f']}), final rule {card['aggregation']['final_rule']}, "
        f"{card['aggregation']['consensus_extra_rounds']} consensus rounds",
        f"- released by {card['released_by']}",
        "",
        "## Hospitals, data and privacy spent",
        "",
        *rows,
        "",
        "Left out by the consensus phase: "
        + (", ".join(f"{e['name']} ({e['why']})" for e in excluded) if excluded else "nobody"),
        "",
        "## Pooled evaluation (secure sum of per-hospital score histograms)",
        "",
        *_pooled_lines(card["pooled_evaluation"]),
        "",
        "## Signatures on the model hash",
        "",
        f"{len(sig['valid_from_known_members'])} of {sig['members']} members signed "
        f"(k = {sig['required']} required): {', '.join(sig['valid_from_known_members'])}",
        "",
        *(f"- {s['name']} `{s['key']}`: `{s['signature']}`" for s in sig["entries"]),
        "",
        "## Membership-inference audit (at the releasing hospital)",
        "",
        f"- attack: {audit['attack']} on {audit['n_members']} training vs "
        f"{audit['n_nonmembers']} held-out patients",
        f"- attack AUC {audit['auc']:.3f} (95% CI {audit['auc_low']:.3f}-"
        f"{audit['auc_high']:.3f}); the gate allows at most {audit['max_auc']:.2f}: "
        f"{'passed' if audit['passed'] else 'FAILED'}",
        f"- TPR {audit['tpr_at_low_fpr']:.3f} at FPR {audit['achieved_fpr']:.4f} "
        f"(target FPR {audit['low_fpr']})",
        "",
    ]
    return "\n".join(parts)


def release(
    config_path: Path,
    state_dir: Path | None,
    out: Path,
    *,
    min_signatures: int | None = None,
    max_attack_auc: float = MAX_ATTACK_AUC,
) -> dict[str, Any]:
    """Check the gate and write the release (module docstring); returns the card."""
    from murmur.node.config import load_config

    config = load_config(config_path)
    state_dir = state_dir or config.node.state_dir
    doc = read_agreement(state_dir)
    known, default_k = members_known(config, state_dir)
    signers = sorted({known[s["key"]] for s in doc["signatures"] if s["key"] in known})
    k = required_signatures(default_k, config.consensus.min_signatures, min_signatures)
    if len(signers) < k:
        raise ReleaseRefused(
            f"release refused: {len(signers)} of {len(known)} members signed the agreed model "
            f"({', '.join(signers) or 'none'}); {k} are required"
        )
    audit = run_audit(config, state_dir, max_attack_auc)
    out.mkdir(parents=True, exist_ok=True)
    (out / "membership_audit.json").write_text(json.dumps(audit.as_dict(), indent=2))
    if not audit.passed:
        raise ReleaseRefused(
            f"release refused: the membership-inference attack reaches AUC {audit.auc:.3f} on "
            f"this hospital's training vs held-out patients, above the gate's "
            f"{max_attack_auc:.2f} ({out / 'membership_audit.json'})"
        )
    shutil.copyfile(Path(state_dir) / AGREED_DIR / MODEL_FILE, out / MODEL_FILE)
    card = model_card(doc, audit, signers, k, config)
    card["exported_program"] = _exported(config, state_dir, out)
    (out / "model_card.json").write_text(json.dumps(card, indent=2, sort_keys=True))
    (out / "model_card.md").write_text(card_markdown(card))
    return card


def _exported(config: Any, state_dir: Path, out: Path) -> str | None:
    """The agreed model as a `torch.export` program (batch size free), where the model
    exports; the file name or None. Load it with `torch.export.load(path).module()`."""
    import torch
    from murmur.models.params import set_state
    from murmur.node.study import Study, load_own_data

    data = load_own_data(config)
    study = Study(config, data)
    set_state(study.model, load_agreed_model(state_dir))
    study.model.eval()
    example = torch.as_tensor(data.x_test[: max(2, min(len(data.x_test), 4))])
    try:
        program = torch.export.export(
            study.model, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},)
        )
    except Exception:
        return None
    torch.export.save(program, str(out / EXPORT_FILE))
    return EXPORT_FILE


# ------------------------------------------------------------------------------ the CLI


def add_model_parser(sub: Any) -> None:
    model = sub.add_parser("model", help="the consortium's agreed model: show it, release it")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    show = model_sub.add_parser(
        "show", help="the agreed hash, signers, round, pooled figures, privacy spent"
    )
    show.add_argument("state_dir", type=Path, help="a node's state directory (holding agreed/)")
    rel = model_sub.add_parser(
        "release",
        help="check signatures and the membership-inference audit, then write the model, "
        "its model card (markdown and JSON) and the audit",
    )
    rel.add_argument("--config", required=True, type=Path, help="this hospital's node config")
    rel.add_argument("--state-dir", type=Path, help="default: the config's [node] state_dir")
    rel.add_argument("--out", required=True, type=Path, help="directory to write the release to")
    rel.add_argument("--min-signatures", type=int, help="k of k-of-n (default: the config's)")
    rel.add_argument(
        "--max-attack-auc",
        type=float,
        default=MAX_ATTACK_AUC,
        help=f"the audit's gate (default {MAX_ATTACK_AUC})",
    )


def model_command(args: Any, stdout: Any) -> int:
    if args.model_command == "show":
        print(show_text(args.state_dir), file=stdout)
        return 0
    card = release(
        args.config,
        args.state_dir,
        args.out,
        min_signatures=args.min_signatures,
        max_attack_auc=args.max_attack_auc,
    )
    print(
        f"released {card['model_sha256']} to {args.out}: "
        f"{len(card['signatures']['valid_from_known_members'])} signatures, attack AUC "
        f"{card['membership_audit']['auc']:.3f}",
        file=stdout,
    )
    return 0
