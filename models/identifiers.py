"""Refuse CSV columns that look like direct identifiers, so a node never trains on them.

HIPAA's Safe Harbor de-identification (45 CFR 164.514(b)(2)) lists the identifiers that must
be removed; the ones a clinical export most often still carries are checked here: names,
medical record / account / health-plan numbers, Social Security numbers, telephone and fax
numbers, e-mail addresses, street addresses and exact dates (of birth, admission, discharge,
death). A column is flagged by its **name** (``patient_name``, ``MRN``, ``ssn``, ``email``,
``dob``, ``admission_date``...) or by its **values** (e-mail addresses, SSN-shaped or
phone-shaped strings, full dates). A model's weights can memorise such a column, and murmur
shares weights, so the loader refuses to start and names the column; a column that only looks
like one (``name_of_test``, a lab's own date code) is declared not identifying in the config
(`data.not_identifying`, `run_cluster.py --not-identifying COLUMN`).

This is a safety net for accidents, not a de-identification tool: free text, rare values and
quasi-identifiers (age over 89, small geographic areas) are not detected.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

# Column-name patterns, matched against the name lower-cased with separators as "_".
_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"(^|_)(first|last|given|family|full|patient|sur)_?name($|_)|^name$", "a person's name"),
    (
        r"^id$|(^|_)(patient|subject|person|participant)_?(id|number|no)($|_)",
        "a patient identifier",
    ),
    (r"(^|_)(mrn|medical_record|record_(number|no|id)|chart_(number|no))($|_)", "a record number"),
    (r"(^|_)(account|acct)(_?(number|no|id))?($|_)", "an account number"),
    (r"(^|_)(health_plan|beneficiary|insurance|member)_?(number|no|id)($|_)", "an account number"),
    (r"(^|_)(ssn|social_security|sozialversicherung|nhs_number|insee)", "a social security number"),
    (r"(^|_)(phone|telephone|tel|mobile|fax)($|_)", "a telephone or fax number"),
    (r"(^|_)(e_?mail)($|_)", "an e-mail address"),
    (r"(^|_)(street|address|addr)($|_)", "a street address"),
    (r"(^|_)(dob|date_of_birth|birth_?date|birthday)($|_)", "an exact date of birth"),
    (r"(^|_)(admission|admit|discharge|death|visit)_?(date|day)($|_)", "an exact date"),
)
_VALUE_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^[^@\s]+@[^@\s]+\.[a-z]{2,}$", re.I), "e-mail addresses"),
    (re.compile(r"^\d{3}-\d{2}-\d{4}$"), "Social Security numbers"),
    (
        re.compile(r"^(\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{4})([ T].*)?$"),
        "exact dates",
    ),
    (re.compile(r"^\+?[\d(][\d\s().-]{8,}\d$"), "telephone numbers"),
)
# A column is flagged by its values when at least this share of its present values match.
_VALUE_SHARE = 0.5


def _normalise(column: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", column.lower()).strip("_")


def identifier_reason(column: str, values: Sequence[str]) -> str | None:
    """Why ``column`` looks like a direct identifier, or None. ``values`` are its cells."""
    name = _normalise(column)
    for pattern, what in _NAME_PATTERNS:
        if re.search(pattern, name):
            return f"its name looks like {what}"
    present = [v for v in values if v.strip()]
    if not present:
        return None
    for pattern, what in _VALUE_PATTERNS:
        matches = sum(1 for v in present if pattern.match(v.strip()))
        if matches >= max(1, _VALUE_SHARE * len(present)) and not _all_plain_numbers(present):
            return f"{matches} of its {len(present)} values look like {what}"
    return None


def _all_plain_numbers(values: Iterable[str]) -> bool:
    """Plain numbers (a lab value, a count) are never an identifier by their values alone."""
    try:
        for value in values:
            float(value)
    except ValueError:
        return False
    return True


def identifier_columns(
    columns: Sequence[str], rows: Sequence[Sequence[str]], not_identifying: Iterable[str] = ()
) -> dict[str, str]:
    """{column: reason} for every column that looks like a direct identifier and is not
    declared otherwise. ``rows`` hold the cells of ``columns``, in that order."""
    declared = set(not_identifying)
    found = {}
    for j, column in enumerate(columns):
        if column in declared:
            continue
        reason = identifier_reason(column, [row[j] for row in rows])
        if reason is not None:
            found[column] = reason
    return found
