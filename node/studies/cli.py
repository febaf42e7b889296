"""`murmur study propose|approve|import|show|list`: the operator's side of a study.

    propose DRAFT.toml --key KEY --out STUDY.json   sign a manifest draft as its proposer
    show STUDY.json                                 what the study is, and its hash
    approve STUDY.json --state DIR --key KEY        this operator's signed approval, kept in
                                                    the node's state and audit log (and, with
                                                    --out, a copy to send other members)
    withdraw STUDY.json --key KEY (--state DIR | --node URL)
                                                    this operator's signed withdrawal of its
                                                    approval: into a stopped node's state, or
                                                    handed to a running node, which gossips it
                                                    and stops before its next round if its
                                                    approvals no longer suffice
    import APPROVAL.json --state DIR --key KEY      another member's approval (or withdrawal),
                                                    checked and kept
    list --state DIR                                the approvals a node holds
    budget STORE                                    a site budget store: which store, how
                                                    far its log goes (to pick the copy that
                                                    reaches a head the peers hold), its runs

Each writes into a state directory only under its lock (never beside a running node) and
audits what it kept, signed with the node's key.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
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
    withdraw,
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
    withdraw_ = study_sub.add_parser("withdraw", help="take this operator's approval back")
    withdraw_.add_argument("manifest", type=Path, help="the signed STUDY.json")
    withdraw_.add_argument("--key", required=True, type=Path, help="the node's NAME.key")
    where = withdraw_.add_mutually_exclusive_group(required=True)
    where.add_argument("--state", type=Path, help="a stopped node's state directory")
    where.add_argument("--node", help="a running node's operator URL, e.g. http://127.0.0.1:9700")
    withdraw_.add_argument("--token-file", type=Path, help="the operator token, if any")
    withdraw_.add_argument("--out", type=Path, help="also write the withdrawal here, to share")
    import_ = study_sub.add_parser("import", help="keep another member's signed approval")
    import_.add_argument("approval", type=Path, help="an approval file (`approve --out`)")
    import_.add_argument("--state", required=True, type=Path, help="the node's state directory")
    import_.add_argument("--key", required=True, type=Path, help="the node's NAME.key")
    list_ = study_sub.add_parser("list", help="the approvals a node holds")
    list_.add_argument("--state", required=True, type=Path)
    budget = study_sub.add_parser("budget", help="a site budget store's position and runs")
    budget.add_argument("store", type=Path, help="the [site_budget] store file")


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
    if command == "budget":
        return _show_budget(args.store, out)
    identity = load_identity(args.key)
    if command == "withdraw":
        manifest = load_manifest(args.manifest)
        approval = withdraw(manifest.id, identity)
        if args.out:
            args.out.write_bytes(approval.encode())
        what = f"withdrawal of the approval of study {manifest.name} ({manifest.id})"
        if args.node:
            return _hand_to_node(args, approval.encode(), what, out)
    elif command == "approve":
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
    if command == "withdraw":
        print("(the node stops the study before its next round when it restarts)", file=out)
    if command == "import":
        print("(whether the approver is a member is checked when the node starts)", file=out)
    return 0


def _hand_to_node(args: argparse.Namespace, record: bytes, what: str, out: TextIO) -> int:
    """POST the record to a running node's operator `/approvals` (behind its token)."""
    headers = {"Content-Type": "application/json"}
    if args.token_file is not None:
        headers["Authorization"] = f"Bearer {args.token_file.read_text().strip()}"
    request = urllib.request.Request(
        f"{args.node.rstrip('/')}/approvals",
        data=b"[" + record + b"]",
        method="POST",
        headers=headers,
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        print(f"murmur: the node refused the {what}: {exc.read()[:200]!r}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"murmur: error: cannot reach the node at {args.node}: {exc}", file=sys.stderr)
        return 1
    print(f"handed to the node ({answer.get('reason')}): {what}", file=out)
    return 0


def _show_budget(path: Path, out: TextIO) -> int:
    """Print the store's instance, writes and log head (verified), and its runs."""
    from murmur.node.studies.site_budget import SiteBudgetStore, StoreRolledBack

    if not path.is_file():
        print(f"murmur: error: no site budget store at {path}", file=sys.stderr)
        return 2
    try:
        store = SiteBudgetStore(path)  # opening verifies the whole log
    except StoreRolledBack as exc:
        print(f"murmur: error: {exc}", file=sys.stderr)
        return 2
    try:
        seq, head = store.verify()
        print(f"store:    {store.position().instance}", file=out)
        print(f"writes:   {seq} (log verified)", file=out)
        print(f"head:     {head}", file=out)
        for dataset in store.datasets():
            for run in store.runs(dataset):
                state = "finished" if run.finished else "running or stopped"
                print(
                    f"{dataset}  {run.name} ({run.study[:12]}): {run.steps_taken} of "
                    f"{run.planned_steps} steps, {state}",
                    file=out,
                )
    finally:
        store.close()
    return 0
