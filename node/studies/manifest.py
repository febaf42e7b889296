"""A study as a signed manifest, identified by the SHA-256 of its content.

Why a manifest: a hospital agrees to *what* is learned from its patients (the data set and
label, the model and its hyper-parameters, the aggregation rule and f, the rounds, the privacy
budget ε and δ, the topology), not to a node that happens to be running. The manifest is that
agreement in one document; its SHA-256 over a canonical encoding is the study's identity, so
an approval of one hash cannot be stretched to cover a manifest with a larger ε.

A manifest is written in TOML (`[study]` plus the config sections a study fixes) and signed
by its proposer (`murmur study propose`), which writes the signed JSON file that approvals,
node configs and `murmur study show` read:

    {"format": "murmur-study/1", "manifest": {...}, "proposer": {"name", "public_key",
     "signature"}}

The canonical encoding is JSON with sorted keys, no whitespace and ASCII escapes
(`canonical_json`); floats use Python's shortest round-trip form, so a manifest read back
from its own file hashes the same.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from murmur.crypto.identity import Identity, check_public_key, verify_signature

MANIFEST_FORMAT = "murmur-study/1"
SIGNATURE_DOMAIN = b"murmur-study-manifest/1\x00"
MAX_MANIFEST_BYTES = 64 * 1024

STUDY_SECTIONS: dict[str, frozenset[str] | None] = {
    # section -> the keys a manifest may fix (None: every key of that config section)
    "data": frozenset(
        {
            "dataset",
            "label",
            "num_hospitals",
            "seed",
            "alpha",
            "site",
            "test_fraction",
            "preprocessing",
            "positive",
            "not_identifying",
        }
    ),
    "model": None,
    "training": None,
    "privacy": None,
    "aggregation": None,
    "server_optimizer": None,
    "personalization": None,
}
"""What a study fixes for every node that runs it. Site facts (which hospital, where its file
lies, keys, addresses) stay in the node's own config."""

STUDY_KEYS = frozenset({"name", "description", "topology", "proposer"})
"""The `[study]` table: its name, what it is for, and the topology or neighbour policy (free
text: the allowlist of each node still decides whom it talks to)."""


class ManifestError(ValueError):
    """A manifest that cannot be used; ``reason`` is the reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def canonical_json(value: Any) -> bytes:
    """The bytes that are hashed and signed: sorted keys, no whitespace, ASCII only, and no
    NaN or infinity (which JSON cannot carry and TOML could)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def check_content(content: Any) -> dict[str, Any]:
    """The manifest's content, checked for shape (the node config checks the values)."""
    if not isinstance(content, dict):
        raise ManifestError("manifest_malformed", "the manifest must be a table")
    unknown = sorted(set(content) - {"study", *STUDY_SECTIONS})
    if unknown:
        raise ManifestError(
            "manifest_malformed",
            f"unknown sections {unknown}; a manifest has [study] and "
            f"{', '.join(f'[{s}]' for s in STUDY_SECTIONS)}",
        )
    study = content.get("study")
    if not isinstance(study, dict) or not isinstance(study.get("name"), str) or not study["name"]:
        raise ManifestError("manifest_malformed", '[study] needs name = "..."')
    bad = sorted(set(study) - STUDY_KEYS)
    if bad:
        raise ManifestError("manifest_malformed", f"[study] unknown keys {bad}")
    for section, allowed in STUDY_SECTIONS.items():
        table = content.get(section, {})
        if not isinstance(table, dict):
            raise ManifestError("manifest_malformed", f"[{section}] must be a table")
        if allowed is not None and set(table) - allowed:
            raise ManifestError(
                "manifest_malformed",
                f"[{section}] keys {sorted(set(table) - allowed)} are site settings, not the "
                "study's: set them in each node's config",
            )
    privacy = content.get("privacy", {})
    if privacy.get("enabled", True):
        for key in ("epsilon", "delta"):
            value = privacy.get(key)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ManifestError(
                    "manifest_malformed",
                    f"[privacy] {key} must be a number: a study states its budget ε and δ",
                )
            if not math.isfinite(value) or value <= 0:
                raise ManifestError("manifest_malformed", f"[privacy] {key} must be > 0")
    try:
        canonical_json(content)
    except ValueError as exc:
        raise ManifestError("manifest_malformed", str(exc)) from None
    return content


def study_id(content: dict[str, Any]) -> str:
    """The study's identity: hex SHA-256 of the canonical content."""
    return hashlib.sha256(canonical_json(content)).hexdigest()


@dataclass(frozen=True)
class StudyManifest:
    """A manifest and its proposer's signature, verified."""

    content: dict[str, Any]
    proposer: str
    proposer_key: bytes
    signature: bytes

    @property
    def id(self) -> str:
        return study_id(self.content)

    @property
    def name(self) -> str:
        return str(self.content["study"]["name"])

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.content.get(name, {}))

    @property
    def privacy_enabled(self) -> bool:
        return bool(self.section("privacy").get("enabled", True))

    @property
    def epsilon(self) -> float | None:
        return float(self.section("privacy")["epsilon"]) if self.privacy_enabled else None

    @property
    def delta(self) -> float | None:
        return float(self.section("privacy")["delta"]) if self.privacy_enabled else None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "manifest": self.content,
            "proposer": {
                "name": self.proposer,
                "public_key": self.proposer_key.hex(),
                "signature": self.signature.hex(),
            },
        }

    def summary(self) -> dict[str, Any]:
        """What `murmur study show` prints and /status names."""
        return {
            "study": self.id,
            "name": self.name,
            "proposer": self.proposer,
            "dataset": self.section("data").get("dataset"),
            "label": self.section("data").get("label"),
            "model": self.section("model").get("name"),
            "rounds": self.section("training").get("rounds"),
            "aggregation": self.section("aggregation").get("rule"),
            "f": self.section("aggregation").get("f"),
            "epsilon": self.epsilon,
            "delta": self.delta,
            "topology": self.content["study"].get("topology"),
        }


def _signed_message(study: str) -> bytes:
    return SIGNATURE_DOMAIN + bytes.fromhex(study)


def sign_manifest(content: dict[str, Any], proposer: Identity) -> StudyManifest:
    """Sign a manifest's content as its proposer."""
    content = check_content(json.loads(canonical_json(content)))
    signature = proposer.sign(_signed_message(study_id(content)))
    return StudyManifest(content, proposer.name, proposer.public_key, signature)


def parse_manifest(document: Any) -> StudyManifest:
    """A signed manifest from its JSON document: shape and proposer signature checked
    (whether the proposer is a member is the caller's question)."""
    if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT:
        raise ManifestError(
            "manifest_malformed",
            f'not a signed study manifest (format = "{MANIFEST_FORMAT}"); sign a draft with '
            "`murmur study propose DRAFT.toml --key KEY --out STUDY.json`",
        )
    content = check_content(document.get("manifest"))
    proposer = document.get("proposer")
    try:
        name = str(proposer["name"])
        key = check_public_key(bytes.fromhex(proposer["public_key"]))
        signature = bytes.fromhex(proposer["signature"])
    except (TypeError, KeyError, ValueError) as exc:
        raise ManifestError("manifest_malformed", f"proposer: {exc}") from None
    if not verify_signature(key, _signed_message(study_id(content)), signature):
        raise ManifestError(
            "manifest_forged",
            f"the proposer signature does not verify for study {study_id(content)[:16]}...: the "
            "manifest was changed after it was signed, or the signature is not the proposer's",
        )
    return StudyManifest(content, name, key, signature)


def load_manifest(path: Path, expected: str | None = None) -> StudyManifest:
    """A signed manifest file; ``expected``: the hash the caller pinned (``study_hash_mismatch``
    when the file's content hashes otherwise)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ManifestError("manifest_unreadable", f"cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError("manifest_malformed", f"{path} is over {MAX_MANIFEST_BYTES} bytes")
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError("manifest_malformed", f"{path} is not JSON: {exc}") from None
    manifest = parse_manifest(document)
    if expected is not None and manifest.id != expected.lower():
        raise ManifestError(
            "study_hash_mismatch",
            f"{path} hashes to {manifest.id}, not the pinned {expected.lower()}",
        )
    return manifest


def load_draft(path: Path) -> dict[str, Any]:
    """An unsigned manifest draft in TOML."""
    try:
        return check_content(tomllib.loads(path.read_text("utf-8")))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ManifestError("manifest_malformed", f"cannot read draft {path}: {exc}") from None


def write_manifest(manifest: StudyManifest, path: Path) -> None:
    """Write the signed manifest as indented JSON (its hash does not depend on layout)."""
    path.write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n")
