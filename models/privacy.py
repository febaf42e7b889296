"""Differential privacy for local training: the accountant, the ledger, and DP randomness.

All of murmur's privacy arithmetic lives here, in one place (as in Opacus's engine):

- `epsilon_for` / `calibrate_noise` ask an established accountant (Google's dp-accounting:
  PLD by default, RDP on request) what a run of Poisson-sampled Gaussian steps costs, or which
  noise multiplier makes a planned run fit a budget. Nothing here does privacy maths by hand.
- `PrivacyLedger` is the node's record of that budget: what the accountant was given
  (sigma, q, delta, steps), how many steps were actually taken, epsilon spent, and a hard stop
  (`BudgetExhausted`) before any step that would exceed the budget. It round-trips through a
  plain JSON-able dict so a restarted node continues from what it already spent.
- `DPSGDGradient` (models/dp_sgd.py, the mechanism itself) turns one Poisson-sampled batch
  into one private gradient, its noise drawn from `private_generator`.
- `private_generator` is where every DP random draw (Poisson sampling and noise) comes from: a
  generator whose whole state is fresh OS entropy, made anew for each use and never saved, so
  no checkpoint, restart or seed can replay or rebuild a step's batch or noise.

docs/privacy.md explains the mechanism, the guarantee and its limits.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

ACCOUNTANTS: tuple[str, ...] = ("pld", "rdp")
"""pld: privacy loss distributions (tight; default). rdp: Renyi DP (looser, the classic)."""

PLD_DISCRETIZATION = 1e-3
"""Grid step of the privacy-loss distribution. dp-accounting rounds pessimistically, so a
coarser grid can only over-state epsilon; 1e-3 is about 10x faster than the 1e-4 default and
raised epsilon by at most 0.3% in our checks (docs/privacy.md has the comparison)."""

RDP_ORDERS: tuple[float, ...] = (
    tuple(1 + x / 10 for x in range(10, 100)) + tuple(range(11, 64)) + (128, 256, 512, 1024)
)
"""dp-accounting's default orders without those below 2: its series for them fails to converge
(and logs a warning per call) and they only matter for epsilons far above any useful budget.
Fewer orders can only make RDP's epsilon larger, never smaller."""

LEDGER_STATE_VERSION = 1


class BudgetExhausted(RuntimeError):
    """The next DP step would spend more than the privacy budget; the node must stop."""


def default_delta(n_patients: int) -> float:
    """delta = min(1e-5, 1 / (10 n)): far below 1/n, the level at which a mechanism may
    publish one random patient's whole record and still be "(epsilon, delta)-DP"."""
    if n_patients < 1:
        raise ValueError(f"n_patients must be >= 1 to choose delta, got {n_patients}")
    return min(1e-5, 1.0 / (10 * n_patients))


@dataclass(frozen=True)
class DPConfig:
    """The privacy budget for the whole planned training, as configured."""

    epsilon: float
    delta: float | None = None  # None: default_delta(n_patients)
    max_grad_norm: float = 1.0
    accountant: str = "pld"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"epsilon must be a finite number > 0, got {self.epsilon}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1) or None for the default, got {self.delta}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {self.max_grad_norm}")
        _check_accountant(self.accountant)

    def resolved_delta(self, n_patients: int) -> float:
        """The delta to use for n_patients; refuses a delta that does not protect anyone."""
        delta = default_delta(n_patients) if self.delta is None else self.delta
        if delta >= 1.0 / n_patients:
            raise ValueError(
                f"delta={delta} is not below 1/n_patients={1 / n_patients:.3g}: at that level a "
                f"mechanism may leak a whole patient record. Fix: omit delta (default "
                f"{default_delta(n_patients):.3g}) or set it below 1/(10 n)"
            )
        return delta


# --------------------------------------------------------------------------- the accountant


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}: use one of {', '.join(ACCOUNTANTS)}")


def _check_mechanism(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def _dp_sgd_event(noise_multiplier: float, sample_rate: float, steps: int) -> Any:
    # Imported here, not at module top: dp-accounting (with scipy) costs about a second to
    # import, and a node that trains without DP should not pay it.
    from dp_accounting import dp_event

    step = dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(noise_multiplier))
    return dp_event.SelfComposedDpEvent(step, int(steps))


def _fresh_accountant(accountant: str) -> Any:
    from dp_accounting import NeighboringRelation
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    # Add/remove one patient: the relation Poisson-sampled DP-SGD is analysed under.
    relation = NeighboringRelation.ADD_OR_REMOVE_ONE
    if accountant == "pld":
        return pld_privacy_accountant.PLDAccountant(relation, PLD_DISCRETIZATION)
    return rdp_privacy_accountant.RdpAccountant(list(RDP_ORDERS), relation)


def epsilon_for(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "pld"
) -> float:
    """Epsilon spent by `steps` DP-SGD steps with Poisson sampling rate q and noise sigma."""
    _check_accountant(accountant)
    _check_mechanism(noise_multiplier, sample_rate, steps, delta)
    if steps == 0:
        return 0.0
    acc = _fresh_accountant(accountant)
    acc.compose(_dp_sgd_event(noise_multiplier, sample_rate, steps))
    return float(acc.get_epsilon(delta))


def composed_epsilon(
    runs: list[tuple[float, float, int]], delta: float, accountant: str = "pld"
) -> float:
    """Epsilon at `delta` of several DP-SGD runs on the same patients, composed in one
    accountant: `runs` are (noise multiplier, sample rate, steps). This is how a hospital's
    studies add up on one data set (node/studies/site_budget.py); under PLD it is tighter than
    the sum of their epsilons, and never looser."""
    _check_accountant(accountant)
    acc = _fresh_accountant(accountant)
    composed = False
    for sigma, q, steps in runs:
        _check_mechanism(sigma, q, steps, delta)
        if steps:
            acc.compose(_dp_sgd_event(sigma, q, steps))
            composed = True
    return float(acc.get_epsilon(delta)) if composed else 0.0


def calibrate_noise(
    epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "pld"
) -> float:
    """The smallest noise multiplier (to 1e-4) whose `steps` steps spend at most `epsilon`.

    dp-accounting's calibrate_dp_mechanism does the root finding (Brent's method); we only
    find a bracket first, halving/doubling from sigma = 1, because its own bracket search
    starts at sigma = 0 where a PLD cannot be built.
    """
    from dp_accounting import mechanism_calibration

    _check_accountant(accountant)
    _check_mechanism(1.0, sample_rate, steps, delta)
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon}")
    if steps == 0:
        raise ValueError("cannot calibrate noise for 0 planned steps; plan at least one step")

    def spent(sigma: float) -> float:
        return epsilon_for(sigma, sample_rate, steps, delta, accountant)

    high = 1.0
    while spent(high) > epsilon:
        high *= 2
        if high > 2**20:
            raise ValueError(
                f"epsilon={epsilon} is too small for {steps} steps at sample rate "
                f"{sample_rate:.4g}: no noise level reaches it. Fix: raise epsilon or plan "
                "fewer rounds/epochs"
            )
    low = high / 2
    while spent(low) <= epsilon:
        high, low = low, low / 2
        if low < 0.05:
            raise ValueError(
                f"epsilon={epsilon} is so large that the noise multiplier would fall below "
                "0.05: that is not a meaningful privacy guarantee. Fix: choose a smaller "
                "epsilon, or disable privacy explicitly"
            )
    sigma = mechanism_calibration.calibrate_dp_mechanism(
        lambda: _fresh_accountant(accountant),
        lambda s: _dp_sgd_event(s, sample_rate, steps),
        epsilon,
        delta,
        mechanism_calibration.ExplicitBracketInterval(low, high),
        tol=1e-4,
    )
    return float(sigma)


# --------------------------------------------------------------------------- the ledger


@dataclass
class PrivacyLedger:
    """A node's privacy budget and every DP step it has taken.

    The ledger holds exactly what the accountant is given, (noise_multiplier, sample_rate,
    steps_taken, delta), so anyone can recompute epsilon_spent from `to_state()`. The noise
    multiplier is fixed when the training is planned (`plan`) and never changes afterwards;
    a restarted node restores the ledger with `from_state` and keeps counting.
    """

    noise_multiplier: float
    sample_rate: float
    delta: float
    epsilon_budget: float
    max_grad_norm: float
    accountant: str = "pld"
    planned_steps: int = 0
    steps_taken: int = 0
    _epsilon_cache: dict[int, float] = field(default_factory=dict, repr=False, compare=False)
    _max_steps: int | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_accountant(self.accountant)
        _check_mechanism(self.noise_multiplier, self.sample_rate, self.steps_taken, self.delta)
        if not (math.isfinite(self.epsilon_budget) and self.epsilon_budget > 0):
            raise ValueError(
                f"epsilon_budget must be a finite number > 0, got {self.epsilon_budget}"
            )
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0, got {self.max_grad_norm}")
        if int(self.planned_steps) != self.planned_steps or self.planned_steps < 0:
            raise ValueError(f"planned_steps must be an integer >= 0, got {self.planned_steps}")

    @classmethod
    def plan(
        cls,
        *,
        epsilon: float,
        delta: float | None,
        n_patients: int,
        sample_rate: float,
        planned_steps: int,
        max_grad_norm: float = 1.0,
        accountant: str = "pld",
    ) -> PrivacyLedger:
        """A fresh ledger whose noise makes `planned_steps` steps spend at most `epsilon`."""
        config = DPConfig(epsilon, delta, max_grad_norm, accountant)
        resolved = config.resolved_delta(n_patients)
        sigma = calibrate_noise(epsilon, resolved, sample_rate, planned_steps, accountant)
        return cls(
            noise_multiplier=sigma,
            sample_rate=sample_rate,
            delta=resolved,
            epsilon_budget=epsilon,
            max_grad_norm=max_grad_norm,
            accountant=accountant,
            planned_steps=int(planned_steps),
        )

    def epsilon_after(self, extra_steps: int) -> float:
        """Epsilon the ledger would show after `extra_steps` more steps."""
        total = self.steps_taken + int(extra_steps)
        if total not in self._epsilon_cache:
            self._epsilon_cache[total] = epsilon_for(
                self.noise_multiplier, self.sample_rate, total, self.delta, self.accountant
            )
        return self._epsilon_cache[total]

    def epsilon_spent(self) -> float:
        """Epsilon spent so far, from the accountant (0 before the first step)."""
        return self.epsilon_after(0)

    def max_steps(self) -> int:
        """The most steps the budget allows in total (at least the planned steps, as a rule).

        Searched once and cached: exponential steps up from the planned count, then bisection.
        """
        if self._max_steps is None:

            def fits(total: int) -> bool:
                return self.epsilon_after(total - self.steps_taken) <= self.epsilon_budget

            low = self.planned_steps if fits(self.planned_steps) else 0  # fits(0) always holds
            gap = 1
            while fits(low + gap):
                low, gap = low + gap, gap * 2
            high = low + gap  # low fits, high does not
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (middle, high) if fits(middle) else (low, middle)
            self._max_steps = low
        return self._max_steps

    def remaining_steps(self) -> int:
        """DP steps the node may still take without exceeding its budget."""
        return max(0, self.max_steps() - self.steps_taken)

    def charge(self, steps: int = 1) -> None:
        """Record `steps` steps about to be taken, or raise BudgetExhausted without recording."""
        if steps < 0:
            raise ValueError(f"cannot charge a negative number of steps ({steps})")
        if steps > self.remaining_steps():
            raise BudgetExhausted(
                f"{steps} more DP step(s) would exceed the budget epsilon={self.epsilon_budget} "
                f"(delta={self.delta:.3g}): {self.steps_taken} steps taken spent "
                f"epsilon={self.epsilon_spent():.4f}, {self.remaining_steps()} step(s) remain"
            )
        self.steps_taken += steps

    def record_steps(self, steps: int) -> None:
        """Record steps that may already have touched the data (e.g. a round interrupted by a
        crash), with no budget check: they are spent whether or not the budget allowed them."""
        if steps < 0:
            raise ValueError(f"cannot record a negative number of steps ({steps})")
        self.steps_taken += int(steps)

    def is_exhausted(self) -> bool:
        return self.remaining_steps() == 0

    def report(self) -> dict[str, Any]:
        """What a status page or audit record shows: the accountant's inputs and its answer."""
        return {
            **self.to_state(),
            "epsilon_spent": self.epsilon_spent(),
            "remaining_steps": self.remaining_steps(),
        }

    def to_state(self) -> dict[str, Any]:
        """Plain, JSON-able state; `from_state` restores it exactly."""
        return {
            "version": LEDGER_STATE_VERSION,
            "accountant": self.accountant,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "epsilon_budget": self.epsilon_budget,
            "max_grad_norm": self.max_grad_norm,
            "planned_steps": self.planned_steps,
            "steps_taken": self.steps_taken,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PrivacyLedger:
        """Rebuild a ledger from `to_state()`; a damaged state raises ValueError, never guesses."""
        if not isinstance(state, dict):
            raise ValueError(f"privacy ledger state must be a dict, got {type(state).__name__}")
        if state.get("version") != LEDGER_STATE_VERSION:
            raise ValueError(
                f"privacy ledger state has version {state.get('version')!r}; this murmur reads "
                f"version {LEDGER_STATE_VERSION}"
            )
        kinds = {
            "accountant": str,
            "noise_multiplier": float,
            "sample_rate": float,
            "delta": float,
            "epsilon_budget": float,
            "max_grad_norm": float,
            "planned_steps": int,
            "steps_taken": int,
        }
        values: dict[str, Any] = {}
        for key, kind in kinds.items():
            if key not in state:
                raise ValueError(f"privacy ledger state lacks {key!r}; the checkpoint is damaged")
            value = state[key]
            ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
            if not ok or isinstance(value, bool):
                raise ValueError(
                    f"privacy ledger state {key!r} must be {kind.__name__}, got {value!r}"
                )
            values[key] = kind(value)
        return cls(**values)


# --------------------------------------------------------------------------- randomness

# torch's CPU generator is a Mersenne Twister (mt19937). Its `manual_seed` keeps only the low
# 32 bits of the seed (tested), so a generator seeded that way has 2^32 possible streams: few
# enough to search. `private_generator` therefore writes all 624 state words (19,968 bits) from
# the OS's CSPRNG, through torch's own state layout, which it checks before trusting it.
_MT_WORDS = 624
_MT_STATE_BYTES = 5056  # torch's CPUGeneratorImplState: a legacy header, the words, normal caches
_MT_WORDS_AT = 24  # after the_initial_seed (u64), left (i32), seeded (i32), next (u64)
_LAYOUT_CHECKED = False


def _check_mt_layout() -> None:
    """Confirm, once, that torch stores mt19937's words where `private_generator` writes them.

    A seeded generator's first word is the seed's low 32 bits (mt19937's initialisation), its
    `left` and `seeded` fields are 1, and each word is a u64 holding a u32. If a torch release
    changes the layout this raises instead of seeding the noise weakly.
    """
    global _LAYOUT_CHECKED
    if _LAYOUT_CHECKED:
        return
    state = torch.Generator().manual_seed(0x5EED_1234).get_state().numpy()
    header = np.frombuffer(state[:_MT_WORDS_AT].tobytes(), dtype="<u4")
    words = np.frombuffer(state[_MT_WORDS_AT : _MT_WORDS_AT + 8 * _MT_WORDS].tobytes(), dtype="<u8")
    if not (
        state.size == _MT_STATE_BYTES
        and int(words[0]) == 0x5EED_1234
        and header[2] == 1  # left
        and header[3] == 1  # seeded
        and int(words.max()) < 2**32
    ):
        raise RuntimeError(
            f"torch {torch.__version__} stores its CPU generator's state in a layout murmur does "
            "not know, so it cannot seed DP noise with full entropy; fix: run the torch version "
            "in pyproject.toml, or update models/privacy.py's private_generator for this one"
        )
    _LAYOUT_CHECKED = True


def private_generator() -> torch.Generator:
    """A new generator for one DP step's Poisson sampling or noise, seeded from OS entropy.

    Why a new one each time, and never saved: a generator restored from a checkpoint replays
    the batches and noise it drew after that checkpoint (a node restarted after releasing a
    round would release the same noise again, and the two releases together cancel it), and a
    saved state lets whoever reads the file rebuild every draw before and after it. A fresh
    state per call, from `secrets`, makes each step's randomness independent of every other
    step's and of anything on disk.

    All 624 mt19937 words come from `secrets` (see `_check_mt_layout`); the generator is still
    a Mersenne Twister, not a cryptographic generator (docs/privacy.md, "Randomness").

    Callers look this function up when they draw (`privacy.private_generator()`), so a test can
    replace it, e.g. with a deliberately replaying double to check that an audit catches it.
    """
    _check_mt_layout()
    generator = torch.Generator()
    state = generator.get_state().numpy().copy()
    entropy = np.frombuffer(secrets.token_bytes(4 * _MT_WORDS), dtype="<u4").astype("<u8")
    state[_MT_WORDS_AT : _MT_WORDS_AT + 8 * _MT_WORDS] = np.frombuffer(
        entropy.tobytes(), dtype=np.uint8
    )
    generator.set_state(torch.from_numpy(state))
    return generator
