"""What DP noise the study plan allows a sender to announce, and each sender's yardstick.

Why its own part: a sender's announced noise parameters (gossip/noise_claims.py) widen the
distance at which a receiver mutes its model as too far (gossip/trust.py
``own_distance_limits``), so the claim must be one an honest site could make. The plan (the
node's training and privacy settings, which a study's manifest fixes for every node) decides
everything but the site's size: the clipping bound C, the learning rate, the batch size, the
local epochs or steps, the rounds, epsilon and delta. From a claimed training-set size n =
B / q the plan gives the sampling rate, the steps and, through the same accountant call the
site's own ledger makes (models/privacy.py ``calibrate_noise``), the noise multiplier. A claim
that does not follow from some n is refused (``dp_out_of_plan``). What bounds the noise a
claim can carry is the smallest site the plan admits, ``privacy.min_site_patients``: a tiny
site's noise is large, so an attacker claiming to be one gets at most that site's yardstick.
Without it, no neighbour is measured with more noise than the receiver's own.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from murmur.gossip.noise_claims import NoiseClaim
from murmur.models.privacy import DPConfig, calibrate_noise
from murmur.models.training import poisson_sample_rate, steps_per_epoch
from murmur.node.config import NodeConfig

REASON = "dp_out_of_plan"
# Floating-point slack when comparing a claim with what the plan computes for it.
_RELATIVE_TOLERANCE = 1e-6
# The accountant's root finding stops at 1e-4 (models/privacy.py calibrate_noise).
_SIGMA_TOLERANCE = 1e-3
# No site has more training rows: a larger claim is refused before the accountant is asked to
# plan billions of steps for it (a claim that large could only narrow its own yardstick).
MAX_SITE_PATIENTS = 10_000_000


@functools.lru_cache(maxsize=256)
def _sigma(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The noise multiplier the site's own ledger plans (models/privacy.py), cached: the same
    few site sizes are checked again every round."""
    return calibrate_noise(epsilon, delta, sample_rate, steps, accountant)


@dataclass(frozen=True)
class NoisePlan:
    """The DP terms every node of the study trains under (the receiver's own config)."""

    dp: bool  # DP-SGD on, with plain SGD (whose noise length a claim describes)
    epsilon: float
    delta: float | None
    max_grad_norm: float
    accountant: str
    batch_size: int
    local_epochs: int
    local_steps: int
    rounds: int
    learning_rate: float  # the schedule's peak: schedules only decay from it
    ledger_steps_per_step: int  # ledger steps per shared-model step (2 with Ditto)
    min_site_patients: int | None

    @classmethod
    def from_config(cls, config: NodeConfig) -> NoisePlan:
        p, t = config.privacy, config.training
        return cls(
            dp=p.enabled and t.optimizer == "sgd" and t.momentum == 0,
            epsilon=p.epsilon,
            delta=p.delta,
            max_grad_norm=p.max_grad_norm,
            accountant=p.accountant,
            batch_size=t.batch_size,
            local_epochs=t.local_epochs,
            local_steps=t.local_steps,
            rounds=t.rounds,
            learning_rate=t.learning_rate,
            ledger_steps_per_step=2 if config.personalization.method == "ditto" else 1,
            min_site_patients=p.min_site_patients,
        )

    def steps(self, patients: int) -> int:
        """Shared-model DP steps a round takes at a site of ``patients`` training rows."""
        if self.local_steps:
            return self.local_steps
        return self.local_epochs * steps_per_epoch(patients, self.batch_size)

    def sigma(self, patients: int) -> float:
        """The noise multiplier the plan's accountant gives a site of ``patients`` rows."""
        delta = DPConfig(self.epsilon, self.delta, self.max_grad_norm).resolved_delta(patients)
        planned = self.steps(patients) * self.ledger_steps_per_step * self.rounds
        q = poisson_sample_rate(patients, self.batch_size)
        return _sigma(self.epsilon, delta, q, planned, self.accountant)

    def claim_for(self, patients: int, learning_rate: float | None = None) -> NoiseClaim:
        """What an honest site of ``patients`` rows announces (at the peak learning rate
        unless given): for tests, and for the adversary mode's loudest claim."""
        q = poisson_sample_rate(patients, self.batch_size)
        return NoiseClaim(
            noise_multiplier=self.sigma(patients),
            max_grad_norm=float(self.max_grad_norm),
            sample_rate=q,
            expected_batch_size=q * patients,
            steps=self.steps(patients),
            learning_rate=float(learning_rate or self.learning_rate),
        )

    def loudest_claim(self, parameters: int = 1) -> NoiseClaim | None:
        """The in-plan claim with the most noise (None when the plan sets no smallest site,
        where no claim widens a yardstick): what the adversary mode announces. The noise
        falls with the site's size but not monotonically: one row past a multiple of the
        batch size adds a step per epoch and halves nothing, so B = n / ceil(n / b) drops.
        Searched over the smallest site and every such size up to four times it."""
        if not self.dp or self.min_site_patients is None:
            return None
        low, b = self.min_site_patients, self.batch_size
        sizes = [low, *range((low // b + 1) * b + 1, 4 * low + b, b)]
        claims = [self.claim_for(n) for n in sizes]
        return max(claims, key=lambda c: c.noise_norm(parameters))

    def check(self, claim: NoiseClaim | None) -> str | None:
        """Why ``claim`` is outside the plan, or None when an honest site could make it.

        Slow the first time a site size is seen (one accountant calibration); run it off the
        event loop. A missing claim is allowed (the sender is then measured with the
        receiver's own noise, as before claims existed)."""
        if claim is None:
            return None
        if not self.dp:
            return "the plan trains without DP-SGD (or with an optimizer that rescales its noise)"
        if not _close(claim.max_grad_norm, self.max_grad_norm):
            return f"clipping bound {claim.max_grad_norm:g}; the plan's is {self.max_grad_norm:g}"
        if claim.learning_rate > self.learning_rate * (1 + _RELATIVE_TOLERANCE):
            return f"learning rate {claim.learning_rate:g} over the plan's {self.learning_rate:g}"
        inverse = 1.0 / claim.sample_rate
        if not claim.patients <= MAX_SITE_PATIENTS or not inverse <= MAX_SITE_PATIENTS:
            return f"B / q = {claim.patients:g} rows; no site has more than {MAX_SITE_PATIENTS}"
        per_epoch = round(inverse)
        if not _close(inverse, per_epoch):
            return f"sample rate {claim.sample_rate:g} is not 1 / (steps per epoch)"
        patients = round(claim.patients)
        if patients < 1 or not _close(claim.patients, patients):
            return f"B / q = {claim.patients:g} is not a whole number of training rows"
        if per_epoch != steps_per_epoch(patients, self.batch_size):
            return (
                f"sample rate 1/{per_epoch} does not follow from {patients} rows at the plan's "
                f"batch size {self.batch_size}"
            )
        floor = self.min_site_patients
        if floor is not None and patients < floor:
            return f"{patients} training rows; the plan admits sites of at least {floor}"
        if claim.steps != self.steps(patients):
            return f"{claim.steps} steps a round; the plan's is {self.steps(patients)}"
        try:
            sigma = self.sigma(patients)
        except (ValueError, ArithmeticError) as exc:  # the plan's delta or epsilon rule it out
            return f"no site of {patients} rows fits the plan: {exc}"
        if claim.noise_multiplier > sigma * (1 + _SIGMA_TOLERANCE):
            return (
                f"noise multiplier {claim.noise_multiplier:.4g}; the plan's accountant gives a "
                f"site of {patients} rows {sigma:.4g}"
            )
        return None

    def yardstick(
        self, claim: NoiseClaim | None, own_noise: float | None, parameters: int
    ) -> float | None:
        """The noise length to expect on a sender's honest model: its checked claim's, capped
        at ``own_noise`` when the plan sets no smallest site; ``own_noise`` without a claim."""
        if claim is None or own_noise is None or not self.dp:
            return own_noise
        announced = claim.noise_norm(parameters)
        if self.min_site_patients is None:
            return min(announced, own_noise)
        return announced


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_RELATIVE_TOLERANCE)
