"""`murmur consortium init|propose|vote|show`: the operator's side of membership.

`init` writes the founding manifest and signs it with the founders' keys given (each founder
can add its own signature later with `init --sign MANIFEST --key ITS.key`); `propose` and
`vote` sign one record with the operator's node key and hand it to the running node's
operator listener (`POST /governance`, node/governance.py), which gossips it to every member;
`show` prints a manifest, or the membership a running node holds. Records are signed here,
on the operator's machine, with the hospital's own key: the node only checks and spreads
them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

from murmur.crypto.identity import load_identity, load_public_key
from murmur.gossip.membership import (
    Manifest,
    Member,
    Vote,
    admit_args,
    make_proposal,
    rotate_args,
)
from murmur.gossip.membership import Membership as _Membership

DEFAULT_TTL_S = 3600.0


def add_consortium_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cons = sub.add_parser("consortium", help="the consortium's manifest, proposals and votes")
    cons_sub = cons.add_subparsers(dest="consortium_command", required=True)
    init = cons_sub.add_parser("init", help="write (or --sign) the founding manifest")
    init.add_argument("--name", help="the consortium's name")
    init.add_argument("--quorum", type=int, help="approvals a change needs (k of n members)")
    init.add_argument(
        "--member",
        action="append",
        default=[],
        help="a founder as NAME=PUBLIC_KEY_OR_.pub@ADDRESS; repeatable",
    )
    init.add_argument("--key", action="append", default=[], type=Path, help="a founder's .key")
    init.add_argument("--out", type=Path, help="where to write the manifest")
    init.add_argument("--sign", type=Path, help="add the --key signatures to this manifest")

    for name, text in (("propose", "propose a membership change"), ("vote", "approve one")):
        p = cons_sub.add_parser(name, help=text)
        p.add_argument("--manifest", required=True, type=Path)
        p.add_argument("--key", required=True, type=Path, help="this hospital's node key")
        p.add_argument(
            "--node", required=True, help="the node's operator URL, e.g. http://127.0.0.1:9700"
        )
        p.add_argument("--token-file", type=Path, help="the operator token, if the node has one")
        p.add_argument("--ttl", type=float, default=DEFAULT_TTL_S, help="seconds it stays valid")
    propose = cons_sub.choices["propose"]
    action = propose.add_mutually_exclusive_group(required=True)
    action.add_argument("--admit", help="admit NAME=PUBLIC_KEY_OR_.pub@ADDRESS")
    action.add_argument("--revoke", help="revoke a member (its name or key)")
    action.add_argument("--rotate-to", type=Path, help="rotate this hospital's key to NEW.key")
    action.add_argument("--set-quorum", type=int, help="change the quorum")
    action.add_argument("--leave", action="store_true", help="this hospital leaves")
    cons_sub.choices["vote"].add_argument("--proposal", required=True, help="the proposal id")

    show = cons_sub.add_parser("show", help="print a manifest or a node's membership")
    show.add_argument("manifest", nargs="?", type=Path)
    show.add_argument("--node", help="a node's operator URL: print the membership it holds")
    show.add_argument("--token-file", type=Path)


def consortium_command(args: argparse.Namespace) -> int:
    if args.consortium_command == "init":
        return _init(args)
    if args.consortium_command == "show":
        return _show(args)
    manifest = Manifest.decode(args.manifest.read_bytes())
    identity = load_identity(args.key)
    expires = time.time() + args.ttl
    if args.consortium_command == "vote":
        unsigned = Vote(
            manifest.consortium_id, bytes.fromhex(args.proposal), identity.public_key, expires
        )
        from murmur.gossip.membership import VOTE_DOMAIN

        record = replace(unsigned, signature=identity.sign(VOTE_DOMAIN + unsigned.body()))
        return _submit(args, record.encode(), f"vote for {args.proposal[:16]}...")
    status = _node_status(args.node, args.token_file)
    membership = _membership_from_status(manifest, status)
    action, action_args = _action(args, membership, identity)
    proposal = make_proposal(identity, membership, action, action_args, expires)
    print(f"proposal {proposal.proposal_id.hex()}: {proposal.describe()}")
    return _submit(args, proposal.encode(), "proposal")


def _action(args: argparse.Namespace, membership: Any, identity: Any) -> tuple[str, dict]:
    if args.admit:
        return "admit", admit_args(_parse_member(args.admit))
    if args.revoke:
        target = membership.by_name(args.revoke)
        key = target.public_key if target is not None else load_public_key(args.revoke)
        return "revoke", {"key": key}
    if args.rotate_to:
        new = load_identity(args.rotate_to)
        return "rotate", rotate_args(new, membership.consortium_id, identity.public_key)
    if args.set_quorum is not None:
        return "quorum", {"k": args.set_quorum}
    return "leave", {"key": identity.public_key}


def _parse_member(text: str) -> Member:
    name, sep, rest = text.partition("=")
    key_text, _, address = rest.partition("@")
    if not sep or not key_text:
        raise ValueError(f"{text!r}: write a member as NAME=PUBLIC_KEY_OR_.pub@ADDRESS")
    return Member(name, load_public_key(key_text), address)


def _init(args: argparse.Namespace) -> int:
    if args.sign is not None:
        manifest = Manifest.decode(args.sign.read_bytes())
        out = args.sign
    else:
        if not (args.name and args.quorum and args.member and args.out):
            raise ValueError("init needs --name, --quorum, --member (each founder) and --out")
        founders = tuple(_parse_member(m) for m in args.member)
        manifest = Manifest(args.name, founders, args.quorum, time.time())
        out = args.out
    for key in args.key:
        manifest = manifest.signed_by(load_identity(key))
    out.write_bytes(manifest.encode())
    missing = manifest.unsigned_founders()
    print(f"wrote {out}: consortium {manifest.consortium!r} id {manifest.consortium_id.hex()}")
    if missing:
        print(
            f"still to sign (murmur consortium init --sign {out} --key ...): {', '.join(missing)}"
        )
    else:
        manifest.verify()
        print("signed by every founder")
    return 0


def _show(args: argparse.Namespace) -> int:
    if args.node:
        print(json.dumps(_node_status(args.node, args.token_file).get("consortium", {}), indent=2))
        return 0
    if args.manifest is None:
        raise ValueError("show needs a manifest file or --node URL")
    manifest = Manifest.decode(args.manifest.read_bytes())
    described = {
        "consortium": manifest.consortium,
        "consortium_id": manifest.consortium_id.hex(),
        "quorum": f"{manifest.quorum} of {len(manifest.founders)}",
        "founders": [m.name for m in manifest.founders],
        "unsigned": manifest.unsigned_founders(),
    }
    print(json.dumps(described, indent=2))
    return 0


def _membership_from_status(manifest: Manifest, status: dict[str, Any]) -> _Membership:
    """The node's current membership as far as building a proposal needs it (epoch, members
    by name): the node checks the proposal itself against its own, fully verified, state."""
    cons = status.get("consortium") or {}
    if cons.get("consortium_id") != manifest.consortium_id.hex():
        raise ValueError("the node runs another consortium than this manifest's")
    members = tuple(
        Member(m["name"], bytes.fromhex(m["public_key"]), m["address"], tuple(m["relays"]))
        for m in cons["members"]
    )
    return _Membership(
        consortium_id=manifest.consortium_id,
        consortium=manifest.consortium,
        epoch=int(cons["epoch"]),
        quorum=int(str(cons["quorum"]).split()[0]),
        members=members,
    )


def _headers(token_file: Path | None) -> dict[str, str]:
    if token_file is None:
        return {}
    return {"Authorization": f"Bearer {token_file.read_text().strip()}"}


def _node_status(url: str, token_file: Path | None) -> dict[str, Any]:
    request = urllib.request.Request(f"{url.rstrip('/')}/status", headers=_headers(token_file))
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _submit(args: argparse.Namespace, record: bytes, what: str) -> int:
    request = urllib.request.Request(
        f"{args.node.rstrip('/')}/governance",
        data=record,
        method="POST",
        headers={**_headers(args.token_file), "Content-Type": "application/octet-stream"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        answer = json.loads(exc.read() or b"{}")
        print(f"murmur: the node refused the {what}: {answer}", file=sys.stderr)
        return 1
    print(f"{what}: {answer.get('reason')} (epoch {answer.get('epoch')})")
    return 0
