"""A sender's DP noise parameters, announced with its update (issue 19).

Why: under DP each honest model carries one round of DP-SGD noise whose length follows from
the sender's own noise multiplier, clipping bound, expected batch size, steps and learning
rate (gossip/aggregation.py ``dp_noise_norm``). A tiny hospital's noise is several times a
large one's, so a receiver that measured every neighbour with its *own* noise length muted
honest tiny sites as too far. With the parameters in the signed, encrypted body, a receiver
can measure each sender against the noise *that sender's* honest model carries, after
checking the claim against what the study plan allows a site of the claimed size
(node/noise_plan.py), so an attacker cannot claim more noise than an honest site could have.

This module is the claim itself and its wire form only: a msgpack map of six numbers, checked
for shape and range (a malformed one is ``malformed``); whether it fits the plan is the
node's business.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from murmur.gossip.aggregation import dp_noise_norm

NOISE_FIELD = "dp_noise"
"""The optional body field carrying a :class:`NoiseClaim`: present exactly when the sender
trains with DP-SGD (plain SGD, whose noise length it describes)."""

_FLOAT_FIELDS = (
    "noise_multiplier",
    "max_grad_norm",
    "sample_rate",
    "expected_batch_size",
    "learning_rate",
)
_FIELDS = frozenset((*_FLOAT_FIELDS, "steps"))
# A round takes at most this many DP steps on the wire (far above any plan: 2**32).
MAX_CLAIMED_STEPS = 2**32


class NoiseClaimError(ValueError):
    """A claim that is not six sane numbers (the wire's ``malformed``)."""


@dataclass(frozen=True)
class NoiseClaim:
    """What one round of the sender's DP-SGD was: sigma, C, q, the expected batch size
    B = q n, the steps T this round and the round's learning rate."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    expected_batch_size: float
    steps: int
    learning_rate: float

    def __post_init__(self) -> None:
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if type(value) not in (int, float) or not (math.isfinite(value) and value > 0):
                raise NoiseClaimError(f"{name} must be a finite number > 0, got {value!r}")
        if not self.sample_rate <= 1:
            raise NoiseClaimError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        if type(self.steps) is not int or not 1 <= self.steps <= MAX_CLAIMED_STEPS:
            raise NoiseClaimError(f"steps must be a whole number in 1..2**32, got {self.steps!r}")

    @property
    def patients(self) -> float:
        """The training rows the claim implies: B / q (a whole number for an honest site)."""
        return self.expected_batch_size / self.sample_rate

    def noise_norm(self, parameters: int) -> float:
        """The length of the DP noise this round added to the sender's model of
        ``parameters`` parameters (gossip/aggregation.py ``dp_noise_norm``)."""
        return dp_noise_norm(
            self.noise_multiplier,
            self.max_grad_norm,
            self.expected_batch_size,
            self.learning_rate,
            self.steps,
            parameters,
        )

    def encode(self) -> dict[str, float | int]:
        """The body field's value: a map of the six numbers."""
        return {
            **{name: float(getattr(self, name)) for name in _FLOAT_FIELDS},
            "steps": self.steps,
        }

    @classmethod
    def decode(cls, value: Any) -> NoiseClaim:
        """The claim in a received body; :class:`NoiseClaimError` unless it is a map of
        exactly the six fields, each a sane number."""
        if type(value) is not dict or set(value) != _FIELDS:
            raise NoiseClaimError(f"{NOISE_FIELD!r} must be a map of exactly {sorted(_FIELDS)}")
        floats = {}
        for name in _FLOAT_FIELDS:
            number = value[name]
            if type(number) not in (int, float):
                raise NoiseClaimError(f"{NOISE_FIELD}.{name} must be a number")
            floats[name] = float(number)
        return cls(steps=value["steps"], **floats)
