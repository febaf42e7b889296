"""Categorical CSV columns: one indicator per agreed value, never a hash bucket.

Hashing values into a fixed number of buckets gave every hospital the same layout without a
shared vocabulary, but two values of one column land in one bucket one time in sixteen for a
yes/no column, which erases the column (measured on a real multi-site trial export: 3 of 19
categorical columns). So the vocabulary is part of the schema the hospitals agree on, like
the column names and kinds:

- with a reference file (what DP needs), its ``categories`` field lists each categorical
  column's values, ``|``-separated (`parse_categories`); a value outside that list is refused
  with the hospital, column and value named, never silently merged;
- without one, the vocabulary is the sorted set of values the loaded sites use in that column
  (the same schema step that already agrees each column's kind across sites): it shares which
  values exist, never how often.

A missing value takes the fill (the site's training mode, or the reference's fill); when
there is none it sets no indicator (all zeros: the model's baseline for that column).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

CATEGORY_SEPARATOR = "|"


class VocabularyError(ValueError):
    """A categorical value or vocabulary is unusable; the message names column and fix."""


def parse_categories(text: str, column: str) -> tuple[str, ...]:
    """``"yes|no|former"`` -> ("yes", "no", "former"): each value once, none empty."""
    values = tuple(v.strip() for v in text.split(CATEGORY_SEPARATOR)) if text.strip() else ()
    if any(v == "" for v in values) or len(set(values)) != len(values):
        raise VocabularyError(
            f"categories {text!r} of column {column!r}: list each value once, separated by "
            f"{CATEGORY_SEPARATOR!r}, none empty (e.g. yes|no)"
        )
    return values


def shared_vocabulary(values_per_site: list[set[str]]) -> tuple[str, ...]:
    """The sorted union of the values every loaded site uses in one column (the schema)."""
    return tuple(sorted(set().union(*values_per_site)))


def indicator_names(column: str, vocabulary: tuple[str, ...]) -> list[str]:
    return [f"{column}={value}" for value in vocabulary]


def one_hot(
    column: str,
    values: list[str] | np.ndarray,
    vocabulary: tuple[str, ...],
    fill: str | None,
    is_missing: Callable[[str], bool],
    hospital: str,
) -> np.ndarray:
    """One indicator column per vocabulary value; a missing value takes ``fill`` (no
    indicator when ``fill`` is None or not in the vocabulary); an unknown value is refused."""
    index = {value: k for k, value in enumerate(vocabulary)}
    out = np.zeros((len(values), len(vocabulary)), dtype=np.float32)
    for i, value in enumerate(values):
        value = fill if is_missing(value) else value
        if value is None:
            continue
        if value not in index:
            if is_missing(value) or value == fill:
                continue
            raise VocabularyError(
                f"hospital {hospital!r}: column {column!r} holds {value!r}, which is not in its "
                f"agreed categories {list(vocabulary)}; fix: add it to the reference file's "
                "categories for that column, or correct the value"
            )
        out[i, index[value]] = 1.0
    return out
