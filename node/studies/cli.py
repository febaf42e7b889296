"""`murmur study propose|approve|import|show|list`: the operator's side of a study.

    propose DRAFT.toml --key KEY --out STUDY.json   sign a manifest draft as its proposer
    show STUDY.json                                 what the study is, and its hash
    approve STUDY.json --state DIR --key KEY        this operator's signed approval, kept in
                                                    the node's state and audit log (and, with
                                                    --out, a copy to send other members)
    import APPROVAL.json --state DIR --key KEY      another member's approval, checked and kept
    list --state DIR                                the approvals a node holds

Each writes into a state directory only under its lock (never beside a running node) and
audits what it kept, signed with the node's key.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from murmur.crypto.identity import load_identity
from murmur.node.audit import AUDIT_FILE, AuditLog
from murmur.node.durable import StateLock
from murmur.node.studies.approvals import (
    DEFAULT_VALID_DAYS,
    ApprovalBook,
    ApprovalError,
    approve,
    decode_approval,
)
from murmur.node.studies.gate import APPROVAL_RECORD
from murmur.node.studies.manifest import (
    load_draft,
    load_manifest,
    sign_manifest,
    write_manifest,
)


def add_study_parser(sub: argparse._SubParsersAction) -> None:
    study = sub.add_parser("study", help="propose, review and approve study manifests")
    study_sub = study.add_subparsers(dest="study_command", required=True)
    propose = study_sub.add_parser("propose", help="sign a TOML manifest draft as its proposer")
    propose.add_argument("draft", type=Path, help="the manifest draft (TOML)")
    propose.add_argument("--key", required=True, type=Path, help="the proposer's NAME.key")
    propose.add_argument("--out", required=True, type=Path, help="the signed STUDY.json to write")
    show = study_sub.add_parser("show", help="print a signed manifest's summary and hash")
    show.add_argument("manifest", type=Path)
    approve_ = study_sub.add_parser("approve", help="approve a study's hash for this node")
    approve_.add_argument("manifest", type=Path, help="the signed STUDY.json")
    approve_.add_argument("--state", required=True, type=Path, help="the node's state directory")
    approve_.add_argument("--key", required=True, type=Path, help="the node's NAME.key")
    approve_.add_argument(
        "--valid-days", type=float, default=DEFAULT_VALID_DAYS, help="validity (default 365)"
    )
    approve_.add_argument("--out", type=Path, help="also write the approval here, to share")
    import_ = study_sub.add_parser("import", help="keep another member's signed approval")
    import_.add_argument("approval", type=Path, help="an approval file (`approve --out`)")
    import_.add_argument("--state", required=True, type=Path, help="the node's state directory")
    import_.add_argument("--key", required=True, type=Path, help="the node's NAME.key")
    list_ = study_sub.add_parser("list", help="the approvals a node holds")
    list_.add_argument("--state", required=True, type=Path)


def study_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out if out is not None else sys.stdout  # looked up now: tests swap sys.stdout
    command = args.study_command
    if command == "propose":
        manifest = sign_manifest(load_draft(args.draft), load_identity(args.key))
        write_manifest(manifest, args.out)
        print(f"study {manifest.name}: {manifest.id} (signed by {manifest.proposer})", file=out)
        return 0
    if command == "show":
        manifest = load_manifest(args.manifest)
        for key, value in manifest.summary().items():
            print(f"{key + ':':<13}{value}", file=out)
        return 0
    if command == "list":
        book = ApprovalBook(args.state)
        for study in book.studies():
            for a in book.of_study(study):
                print(
                    f"{study}  {a.approver:<16} issued {a.issued_at:.0f} "
                    f"expires {a.expires_at:.0f}",
                    file=out,
                )
        return 0
    identity = load_identity(args.key)
    if command == "approve":
        manifest = load_manifest(args.manifest)
        approval = approve(manifest.id, identity, valid_days=args.valid_days)
        if args.out:
            args.out.write_bytes(approval.encode())
        what = f"study {manifest.name} ({manifest.id})"
    else:
        try:
            approval = decode_approval(args.approval.read_bytes())
        except ApprovalError as exc:
            print(f"murmur: error: {args.approval}: {exc}", file=sys.stderr)
            return 2
        what = f"{approval.approver}'s approval of study {approval.study}"
    with StateLock(args.state):
        try:
            kept = ApprovalBook(args.state).offer(approval)
        except ApprovalError as exc:
            print(f"murmur: error: {exc}", file=sys.stderr)
            return 2
        if kept:
            with AuditLog(args.state / AUDIT_FILE, identity) as audit:
                audit.append(APPROVAL_RECORD, None, **approval.to_json(), via=command)
                audit.sign_head()
    print(f"{'kept' if kept else 'already held'}: {what}", file=out)
    if command == "import":
        print("(whether the approver is a member is checked when the node starts)", file=out)
    return 0
