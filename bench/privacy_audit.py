"""An empirical privacy audit of murmur's DP-SGD that can fail (issue #15, item 4).

The accountant says how much privacy a training run spends *if the code does what the
accountant assumes*. This audit checks the code: it trains with planted canaries and turns
a membership attack on them into a LOWER bound on epsilon that holds with 95% confidence,
using the one-run audit of Steinke, Nasr and Jagielski, "Privacy Auditing with One (1)
Training Run" (NeurIPS 2023, arXiv:2305.08846). A correct mechanism keeps the bound at or
below the epsilon the ledger reports, whatever the attack; a mechanism that leaks more than it
reports can push the bound above it, and then the audit has caught a bug.

The run
-------
m canary slots are drawn by the auditor; each canary is included with probability 1/2,
independently (S_i in {in, out}), and the rest of the hospital's data (breast-cancer patients)
is always in. One training run of murmur's real `LocalTrainer` follows, with a
`PrivacyLedger` planned by `PrivacyLedger.plan` for the target epsilon. The attacker sees the
model before and after training (and after every round for the replay check): the white-box
setting the paper allows for DP-SGD. It scores every canary, guesses "in" for the k highest
scores and "out" for the k lowest, abstains on the rest, and the bound follows from how many
of its r = 2k guesses are right.

Canary design ("Dirac" gradient canaries, clipped like every other patient)
---------------------------------------------------------------------------
The model is an ordinary `nn.Module` whose only trainable parameter is one `nn.Linear`
weight W (channels x features, no bias), so DP-SGD runs its fast hook engine on it. A row is
(a: features, l: channel, o: offset) and its logit is (W a)_l + o, with the channel and the
offset fixed, not trained (the offset is a GLM offset). Real patients use channel 0 and
a = (their 30 standardised measures, 1): a logistic regression with intercept. Canary i owns
one coefficient W[l_i, j_i] (l_i >= 1, never touched by a patient): its row has
a = A e_j, channel l_i, a label y_i and an offset of -30 (y = 1) or +30 (y = 0). Its logit is
about -/+30, confidently wrong, so its per-sample gradient is
(p - y) w_y A e_l e_j^T: a known direction, the same at every step, with norm about A w_y
(A = 10) far above C. DPSGDGradient therefore clips it to exactly C, so each step that
samples the canary moves W[l_i, j_i] by exactly lr C / (q n): the most one record may move
the sum, i.e. the canary attains the sensitivity the accountant assumes. The directions
e_l e_j^T are orthogonal to each other and to every patient's gradient, so the only thing
besides the canary itself that moves its coefficient is DP-SGD's noise. The score is the
total change of the coefficient in units of lr C / (q n), sign-corrected:

    score_i = K_i [i in] + sigma sqrt(T) Z_i,   K_i ~ Binomial(T, q),  Z_i ~ N(0, 1).

An excluded canary is not dropped: its row becomes a null row (a = 0), whose gradient is
exactly zero. The number of rows n, hence q, the expected batch size q n and the class counts
(null rows keep the slot's label) are then the same for every draw of S, and including or
excluding canary i differs only by canary i's clipped gradient in the steps that sample it (a
null row adds nothing to any sum): the add/remove-one-record relation, at fixed q, that
dp-accounting analyses. So the
(epsilon, delta) the ledger reports is exactly the claim under test.

Why this measures murmur's mechanism, not a re-implementation: the rows go through
`LocalTrainer.train_steps` (its Poisson sampler and private randomness), `DPSGDGradient`
(per-sample gradients from the hook engine, `clip_factors`, Gaussian noise sigma C from the
trainer's private generator), and the trainer's optimizer step; sigma is the one
`PrivacyLedger.plan` calibrated and the claimed epsilon is `ledger.epsilon_spent()` after the
run. The audit only builds rows and reads weights. Its model and rows are crafted, but
DP-SGD's guarantee is for any model and any records, so an auditor may pick them (the usual
white-box audit threat model). Two checks read the mechanism back from the run: sigma
measured from the out-canaries' scores (their coefficient moves by noise only) must match the
ledger's, and the mean in-minus-out score per expected inclusion must be 1 (each inclusion
moved the coefficient by exactly C: clipping happened).

The bound (exactly the paper's)
-------------------------------
With m canaries included independently with probability 1/2, an attack making r guesses of
which v are right, and a mechanism that is (epsilon, delta)-DP, the paper's main result
(arXiv numbering: Theorem 3.1; for delta > 0, Corollary 5.4 of Section 5, computed by the
`p_value_DP_audit` code of Appendix D) bounds the chance of v or more right guesses by

    p(epsilon) = P[Binomial(r, q_e) >= v] + 2 m delta alpha,   q_e = e^eps / (1 + e^eps),
    alpha = max_{i = 1..v} P[v - i <= Binomial(r, q_e) < v] / i.

For delta = 0 this is the binomial tail alone: an epsilon-DP mechanism makes the attack no
better than randomised response with accuracy q_e. The audit rejects "(epsilon, delta)-DP"
when p(epsilon) < the significance level, and reports the largest rejected epsilon as the
lower bound. The attack tries a fixed grid of guess counts `GUESS_FRACTIONS`; each is tested
at significance 0.05 / len(grid) (Bonferroni), so the reported maximum is still a 95% bound.
The binomial bound is an auditing statistic, not an accountant: the claim it tests comes
from dp-accounting through the ledger.

What it can and cannot show: a bound above the reported epsilon proves (at 95%) that the run
leaked more than reported. A bound below it proves nothing about the upper bound: one-run
audits are loose, the honest bound is far below epsilon, and m canaries can never show more
than `max_provable_epsilon(m, delta)` (9.4 for 80,000 at delta = 1e-7), since the bound
needs about e^eps guesses without an error. docs/privacy.md ("Empirical privacy audit") has the
numbers.

Two broken mechanisms are test doubles, installed by one small helper each:
- `noise_divided_by(10)`: DP-SGD adds sigma/10 noise while the ledger still plans and
  reports sigma (the required detection).
- `replayed_randomness`: the restart bug, every step's sampling and noise drawn from a
  generator seeded with the same seed, so every step repeats the same batch and the same
  noise vector. Successive rounds' updates then differ by noise-free gradient differences.
  "Drifting" canaries (offset 0, A = 1: unclipped, their gradient changes as their coefficient
  moves) expose that to an attack on the per-round models, which peers see in murmur.

Run: python bench/privacy_audit.py [--quick] [--canaries M] [--epochs E] [--batch-size B]
(full: 80,000 canaries, 6 runs, about 80 s on one thread; --quick: 40,000, about 40 s)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import murmur.models.privacy as privacy
import murmur.models.training as training
import numpy as np
import torch
from murmur.models.data import load_dataset
from murmur.models.privacy import PrivacyLedger
from murmur.models.training import LocalTrainer, TrainingSettings
from scipy import special, stats
from torch import nn

SIGNIFICANCE = 0.05
"""1 - confidence of every bound (95%, as in the paper)."""

GUESS_FRACTIONS: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.25, 0.5, 0.8)
"""Guess counts the attack tries, as fractions of m. Fixed in advance, and each is tested at
SIGNIFICANCE / len(GUESS_FRACTIONS), so taking the best still gives a 95% bound. Small
fractions serve weak signals (the honest mechanism, the replay bug's few exposed canaries),
large ones a strong signal (sigma / 10 at epsilon = 8 needs nearly all m right)."""

AUDIT_DELTA = 1e-7
"""The delta the audited runs plan with (murmur's `delta` setting). The one-run bound pays
2 m delta alpha (see `p_value`). With murmur's default delta = 1 / (10 n), 2 m delta is about
0.2 however many canaries there are, and it caps what this attack can show at 8.1 even with
80,000 canaries (`max_provable_epsilon`): too close to epsilon = 8 to catch a leak there. A
smaller delta is a stronger claim (the ledger plans more noise for it), so auditing it is no
easier for the mechanism."""

CANARY_OFFSET = 30.0
"""|logit offset| of a Dirac canary: sigmoid(-30 + drift) stays within 1e-9 of 0, so its loss
gradient stays saturated (norm ~ A w_y >> C) however far training moves its coefficient."""


# --------------------------------------------------------------------------- the bound


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[v or more of r guesses right] under (epsilon, delta)-DP: Steinke et al.'s bound.

    p = P[Binomial(r, q) >= v] + 2 m delta max_{i=1..v} P[v - i <= Binomial(r, q) < v] / i,
    q = e^eps / (1 + e^eps), capped at 1 (Theorem 3.1 for delta = 0; Corollary 5.4 and
    Appendix D's `p_value_DP_audit` for delta > 0, arXiv:2305.08846).
    """
    _check_counts(m, r, v)
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    q = float(special.expit(epsilon))
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return min(beta, 1.0)
    # partial[i - 1] = P[v - i <= Binomial(r, q) <= v - 1], for i = 1..v.
    partial = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = float(np.max(partial / np.arange(1, v + 1)))
    return min(beta + 2 * m * delta * alpha, 1.0)


def epsilon_lower_bound(
    m: int, r: int, v: int, delta: float, significance: float = SIGNIFICANCE
) -> float:
    """The largest epsilon that v right guesses out of r reject at `significance`.

    That is, no (epsilon', delta)-DP mechanism with epsilon' below the returned value lets the
    attack do this well except with probability `significance`. Appendix D's search: grow
    the bracket until p(eps_high) >= significance, then bisect, returning the low end (where
    the claim is still rejected). 0 when not even epsilon = 0 is rejected.
    """
    _check_counts(m, r, v)
    if not 0 < significance < 1:
        raise ValueError(f"significance must be in (0, 1), got {significance}")

    def rejected(epsilon: float) -> bool:
        return p_value(m, r, v, epsilon, delta) < significance

    if r == 0 or not rejected(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejected(high):
        low, high = high, 2 * high
    while high - low > 1e-6:
        middle = (low + high) / 2
        low, high = (middle, high) if rejected(middle) else (low, middle)
    return low


def _check_counts(m: int, r: int, v: int) -> None:
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct v <= guesses r <= canaries m, got {v}, {r}, {m}")


# --------------------------------------------------------------------------- the attack


@dataclass(frozen=True)
class AttackResult:
    """The best of the attack's fixed guess counts, and the bound it gives."""

    guesses: int  # r: canaries guessed (the rest abstained on)
    correct: int  # v
    epsilon_lower_bound: float
    significance: float  # per guess count, after the Bonferroni correction


def audit_scores(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    *,
    both_sides: bool = True,
    fractions: Sequence[float] = GUESS_FRACTIONS,
    significance: float = SIGNIFICANCE,
) -> AttackResult:
    """Guess "in" for the highest scores (and "out" for as many lowest), bound epsilon.

    The guesses depend on the scores only; `included` (the auditor's secret coin flips) is
    used only to count right guesses. With `both_sides` False the attack only guesses "in"
    (the replay attack's low scores say nothing).
    """
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and included {included.shape} must be 1-d alike")
    m = len(scores)
    order = np.argsort(-scores, kind="stable")  # highest first
    in_sorted = included[order]
    per_test = significance / len(fractions)
    best = AttackResult(0, 0, 0.0, per_test)
    for fraction in fractions:
        r = min(m, max(1, round(fraction * m)))
        k_in = (r + 1) // 2 if both_sides else r
        k_out = r - k_in
        correct = int(in_sorted[:k_in].sum()) + int((~in_sorted[m - k_out :]).sum())
        bound = epsilon_lower_bound(m, r, correct, delta, per_test)
        if bound > best.epsilon_lower_bound:
            best = AttackResult(r, correct, bound, per_test)
    return best


# --------------------------------------------------------------------------- canaries


class CanaryLogit(nn.Module):
    """logit = (W a)_l + o for a row (a, l, o): W is the one trainable nn.Linear weight.

    Channel 0 with a = (features, 1) is a logistic regression with intercept; channel l >= 1
    holds canary coefficients. Channel and offset are fixed inputs, not parameters, so DP-SGD
    sees one Linear layer and uses its hook engine.
    """

    def __init__(self, features: int, channels: int) -> None:
        super().__init__()
        self.features = features
        self.linear = nn.Linear(features, channels, bias=False)
        nn.init.zeros_(self.linear.weight)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        a = rows[:, : self.features]
        channel = rows[:, self.features].long().unsqueeze(1)
        offset = rows[:, self.features + 1]
        return self.linear(a).gather(1, channel).squeeze(1) + offset


@dataclass(frozen=True)
class CanaryKind:
    """How canary rows are made: amplitude A of a = A e_j, and |offset| of the logit."""

    name: str
    amplitude: float
    offset: float


DIRAC = CanaryKind("dirac", amplitude=10.0, offset=CANARY_OFFSET)
"""Saturated: clipped to exactly C at every step (the main audit)."""
DRIFTING = CanaryKind("drifting", amplitude=1.0, offset=0.0)
"""Unclipped (norm ~ 0.5 w_y < C), and its gradient changes as its coefficient moves: under
replayed noise, successive rounds differ by noise-free changes of it (the replay audit)."""


@dataclass(frozen=True)
class CanaryData:
    """The training rows of one audit and what the auditor keeps secret about them."""

    rows: torch.Tensor  # (n, features + 2): patients first, then one row per canary slot
    labels: torch.Tensor  # (n,)
    included: np.ndarray  # (m,) bool: S, the auditor's coin flips
    sign: np.ndarray  # (m,) +1 where including the canary pushes its coefficient up
    features: int
    channels: int

    @property
    def canaries(self) -> int:
        return len(self.included)


def canary_data(
    x_patients: np.ndarray,
    y_patients: np.ndarray,
    canaries: int,
    kind: CanaryKind,
    rng: np.random.Generator,
) -> CanaryData:
    """Patients' rows plus `canaries` slots, each a canary (probability 1/2) or a null row."""
    n_patients, measures = x_patients.shape
    features = max(measures + 1, math.ceil(math.sqrt(canaries)))
    channels = 1 + math.ceil(canaries / features)
    included = rng.random(canaries) < 0.5
    labels_c = (np.arange(canaries) % 2).astype(np.float32)  # balanced, and the same if out
    sign = np.where(labels_c == 1, 1.0, -1.0)  # y = 1: p - y < 0, so descent raises W[l, j]
    rows = np.zeros((n_patients + canaries, features + 2), dtype=np.float32)
    rows[:n_patients, :measures] = x_patients
    rows[:n_patients, measures] = 1.0  # intercept; channel 0, offset 0
    slot = np.arange(canaries)
    canary_rows = rows[n_patients:]
    canary_rows[:, features + 1] = -sign * kind.offset  # y = 1: -30, y = 0: +30
    chosen = slot[included]
    canary_rows[chosen, chosen % features] = kind.amplitude
    canary_rows[chosen, features] = 1 + chosen // features  # out: a = 0, channel 0: no gradient
    labels = np.concatenate([np.asarray(y_patients, dtype=np.float32), labels_c])
    return CanaryData(
        torch.from_numpy(rows), torch.from_numpy(labels), included, sign, features, channels
    )


def canary_coefficients(model: CanaryLogit, canaries: int) -> np.ndarray:
    """W[l_i, j_i] for every slot i, in slot order (slot i is channel 1 + i // features)."""
    return model.linear.weight.detach()[1:].reshape(-1)[:canaries].numpy().astype(np.float64)


# --------------------------------------------------------------------------- broken doubles


@contextlib.contextmanager
def noise_divided_by(factor: float) -> Iterator[None]:
    """Trainers built inside this context add sigma / factor noise; their ledgers still plan,
    charge and report sigma. The bug the audit must catch: an accountant that is right about a
    mechanism the code does not run. Swaps the DPSGDGradient class models.training builds."""
    original = training.DPSGDGradient

    class QuieterDPSGD(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, noise_multiplier: float, **kwargs: object) -> None:
            super().__init__(*args, noise_multiplier=noise_multiplier / factor, **kwargs)

    training.DPSGDGradient = QuieterDPSGD  # type: ignore[misc]
    try:
        yield
    finally:
        training.DPSGDGradient = original  # type: ignore[misc]


@contextlib.contextmanager
def replayed_randomness(seed: int) -> Iterator[None]:
    """The restart bug as a test double: each step's sampling and noise come from a generator
    seeded with the same `seed`.

    murmur draws all DP randomness from `models.privacy.private_generator()` (a fresh OS-seeded
    generator per step, looked up at call time), so replacing it with one that returns a
    generator seeded with `seed` makes every step replay the same draws. This is the only place
    that knows how murmur draws its private randomness.
    """
    original = privacy.private_generator
    privacy.private_generator = lambda: torch.Generator().manual_seed(seed)
    try:
        yield
    finally:
        privacy.private_generator = original


# --------------------------------------------------------------------------- one audit


@dataclass(frozen=True)
class AuditConfig:
    """One audited training run. `mechanism`: "honest", "noise/10" or "replay"."""

    epsilon: float
    canaries: int = 40_000
    epochs: int = 30  # rounds of one local epoch each
    batch_size: int = 512
    learning_rate: float = 0.05
    max_grad_norm: float = 1.0
    mechanism: str = "honest"
    canary: str = "dirac"  # "dirac" (final-model attack) or "drifting" (per-round attack)
    seed: int = 0  # the auditor's coin flips and the patients' split; DP randomness is murmur's
    delta: float | None = AUDIT_DELTA  # None: murmur's default, min(1e-5, 1 / (10 n))

    def __post_init__(self) -> None:
        if self.mechanism not in ("honest", "noise/10", "replay"):
            raise ValueError(f"unknown mechanism {self.mechanism!r}")
        if self.canary not in ("dirac", "drifting"):
            raise ValueError(f"unknown canary kind {self.canary!r}")
        if self.canary == "drifting" and self.epochs < 3:
            raise ValueError("the per-round attack needs at least 3 rounds")


@dataclass(frozen=True)
class AuditResult:
    """What one audit found; epsilon_lower_bound > epsilon_reported means the run leaked."""

    config: AuditConfig
    epsilon_reported: float  # the ledger's epsilon_spent() after the run
    delta: float
    noise_multiplier: float  # what the ledger planned and reports
    noise_measured: float  # out-canaries: score std / sqrt(T) (drifting: round-to-round)
    signal_per_inclusion: float  # Dirac: mean (in - out) score / (T q), 1 when clipped to C
    min_canary_norm: float  # smallest canary gradient norm / C at the start and at the end
    sample_rate: float
    steps: int
    attack: AttackResult
    seconds: float

    @property
    def epsilon_lower_bound(self) -> float:
        return self.attack.epsilon_lower_bound

    @property
    def violated(self) -> bool:
        return self.epsilon_lower_bound > self.epsilon_reported


def patients(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One hospital's training rows of the breast-cancer data (standardised, 1 = malignant)."""
    hospital = load_dataset("breast-cancer", num_hospitals=1, seed=seed)[0]
    return hospital.x_train, hospital.y_train


def run_audit(config: AuditConfig) -> AuditResult:
    """Plant canaries, train once with murmur's DP-SGD, attack, and bound epsilon."""
    started = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    kind = DIRAC if config.canary == "dirac" else DRIFTING
    x_patients, y_patients = patients(config.seed)
    data = canary_data(x_patients, y_patients, config.canaries, kind, rng)
    model = CanaryLogit(data.features, data.channels)
    settings = TrainingSettings(
        batch_size=config.batch_size, learning_rate=config.learning_rate, local_epochs=1
    )
    n = len(data.labels)
    ledger = PrivacyLedger.plan(
        epsilon=config.epsilon,
        delta=config.delta,
        n_patients=n,
        sample_rate=training.poisson_sample_rate(n, config.batch_size),
        planned_steps=config.epochs * training.steps_per_epoch(n, config.batch_size),
        max_grad_norm=config.max_grad_norm,
    )
    broken = noise_divided_by(10) if config.mechanism == "noise/10" else contextlib.nullcontext()
    with broken:
        trainer = LocalTrainer(model, data.rows, data.labels, settings, ledger)
    norms = [_canary_gradient_norms(trainer, data)]
    before = canary_coefficients(model, data.canaries)
    snapshots = [before]
    replay = (
        replayed_randomness(config.seed)
        if config.mechanism == "replay"
        else contextlib.nullcontext()
    )
    with replay:
        for _ in range(config.epochs):
            for _ in range(trainer.steps_per_round()):
                trainer.train_steps(1)
            snapshots.append(canary_coefficients(model, data.canaries))
    norms.append(_canary_gradient_norms(trainer, data))
    steps = ledger.steps_taken
    q = trainer.sample_rate()
    unit = config.learning_rate * config.max_grad_norm / trainer.expected_batch_size()
    # Each slot's coefficient change, in units of one clipped inclusion, sign-corrected.
    total = data.sign * (snapshots[-1] - before) / unit
    out, inc = total[~data.included], total[data.included]
    signal: float
    if config.canary == "dirac":
        noise_measured = float(out.std() / math.sqrt(steps))
        signal = float((inc.mean() - out.mean()) / (steps * q))
        attack = audit_scores(total, data.included, ledger.delta)
    else:
        # Drifting canaries are not clipped to C, so their mean signal measures nothing here.
        signal = math.nan
        rounds = np.diff(np.stack(snapshots), axis=0) / unit  # (epochs, m)
        scores = np.abs(np.diff(rounds, axis=0)).sum(0)  # how much successive rounds differ
        per_round = np.diff(rounds, axis=0)[:, ~data.included]
        noise_measured = float(per_round.std() / math.sqrt(2 * trainer.steps_per_round()))
        attack = audit_scores(scores, data.included, ledger.delta, both_sides=False)
    return AuditResult(
        config=config,
        epsilon_reported=ledger.epsilon_spent(),
        delta=ledger.delta,
        noise_multiplier=ledger.noise_multiplier,
        noise_measured=noise_measured,
        signal_per_inclusion=signal,
        min_canary_norm=min(norms) / config.max_grad_norm,
        sample_rate=q,
        steps=steps,
        attack=attack,
        seconds=time.perf_counter() - started,
    )


def _canary_gradient_norms(trainer: LocalTrainer, data: CanaryData) -> float:
    """The smallest per-sample gradient norm among included canaries, at the current model.

    For this model a row's gradient is (dloss/dlogit) e_l a^T, so its norm is
    |dloss/dlogit| ||a|| (the trainer's own loss, class weights included)."""
    start = len(data.labels) - data.canaries
    rows = data.rows[start:][torch.from_numpy(data.included)]
    labels = data.labels[start:][torch.from_numpy(data.included)]
    logits = trainer.model(rows).detach().requires_grad_(True)
    (slope,) = torch.autograd.grad(trainer.loss_fn(logits, labels).sum(), logits)
    norms = slope.abs() * rows[:, : data.features].norm(dim=1)
    return float(norms.min())


# --------------------------------------------------------------------------- the benchmark


def max_provable_epsilon(m: int, delta: float) -> float:
    """The largest bound this attack can give with m canaries: its most guesses, all right."""
    r = round(max(GUESS_FRACTIONS) * m)
    return epsilon_lower_bound(m, r, r, delta, SIGNIFICANCE / len(GUESS_FRACTIONS))


@dataclass(frozen=True)
class BenchSize:
    """How big the benchmark's runs are. q = 1 / ceil(n / batch) stays near 1/80 in both."""

    canaries: int
    epochs: int
    batch_size: int


FULL = BenchSize(canaries=80_000, epochs=40, batch_size=1024)
"""80,000 canaries can show epsilon up to 9.4: enough to catch sigma / 10 at epsilon = 8."""
QUICK = BenchSize(canaries=40_000, epochs=40, batch_size=512)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40,000 canaries instead of 80,000")
    parser.add_argument("--canaries", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="the auditor's coin flips")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as a node trains (node/threads.py)
    started = time.perf_counter()
    size = QUICK if args.quick else FULL
    size = BenchSize(
        args.canaries or size.canaries,
        args.epochs or size.epochs,
        args.batch_size or size.batch_size,
    )
    plan = [
        AuditConfig(eps, size.canaries, size.epochs, size.batch_size, mechanism=m, seed=args.seed)
        for eps in (1.0, 8.0)
        for m in ("honest", "noise/10")
    ]
    plan += [
        AuditConfig(
            1.0, size.canaries, size.epochs, size.batch_size, mechanism=m, canary="drifting",
            seed=args.seed,
        )
        for m in ("honest", "replay")
    ]  # fmt: skip
    print(
        f"One-run privacy audit of murmur's DP-SGD: {size.canaries} canaries (each in with "
        f"probability 1/2), {size.epochs} rounds of one epoch, expected batch "
        f"{size.batch_size}, 95% confidence (Steinke, Nasr & Jagielski 2023)\n"
    )
    results: dict[tuple[float, str, str], AuditResult] = {}
    for config in plan:
        result = run_audit(config)
        results[(config.epsilon, config.mechanism, config.canary)] = result
        print_row(result, header=len(results) == 1)
    seconds = time.perf_counter() - started
    honest = [results[(eps, "honest", "dirac")] for eps in (1.0, 8.0)]
    broken = [results[(eps, "noise/10", "dirac")] for eps in (1.0, 8.0)]
    replay = results[(1.0, "replay", "drifting")]
    most = max_provable_epsilon(size.canaries, honest[1].delta)
    print(
        f"\nsigma meas.: sigma read back from the run (out-canaries move by noise only); "
        f"signal/C: mean in-minus-out score per expected inclusion (1 = clipped to C). "
        f"\nThe most this attack can show with {size.canaries} canaries: epsilon {most:.2f} "
        f"(every guess right, delta {honest[1].delta:.2g}). Total {seconds:.0f} s."
    )
    summary = {
        "eps_reported_1": round(honest[0].epsilon_reported, 4),
        "eps_lower_bound_1": round(honest[0].epsilon_lower_bound, 4),
        "eps_reported_8": round(honest[1].epsilon_reported, 4),
        "eps_lower_bound_8": round(honest[1].epsilon_lower_bound, 4),
        "broken_detected": all(r.violated for r in broken),
        "eps_lower_bound_broken_1": round(broken[0].epsilon_lower_bound, 4),
        "eps_lower_bound_broken_8": round(broken[1].epsilon_lower_bound, 4),
        "honest_within_reported": not any(r.violated for r in honest),
        "replay_detected": replay.violated,
        "eps_lower_bound_replay_1": round(replay.epsilon_lower_bound, 4),
        "eps_lower_bound_replay_attack_honest_1": round(
            results[(1.0, "honest", "drifting")].epsilon_lower_bound, 4
        ),
        "delta": honest[0].delta,
        "canaries": size.canaries,
        "epochs": size.epochs,
        "batch_size": size.batch_size,
        "max_provable_eps": round(most, 4),
        "seconds": round(seconds, 1),
    }
    print(json.dumps(summary))


def print_row(r: AuditResult, *, header: bool) -> None:
    if header:
        line = (
            f"{'eps':>4} {'mechanism':<9} {'canary':<8}{'eps rep.':>9}{'sigma':>8}"
            f"{'sigma meas.':>12}{'signal/C':>9}{'steps':>7}{'guesses':>8}{'right':>7}"
            f"{'eps lower':>10}  verdict"
        )
        print(line)
        print("-" * len(line))
    verdict = "LEAK DETECTED (lower > reported)" if r.violated else "within reported"
    signal = "-" if math.isnan(r.signal_per_inclusion) else f"{r.signal_per_inclusion:.3f}"
    print(
        f"{r.config.epsilon:>4g} {r.config.mechanism:<9} {r.config.canary:<8}"
        f"{r.epsilon_reported:>9.3f}{r.noise_multiplier:>8.3f}{r.noise_measured:>12.3f}"
        f"{signal:>9}{r.steps:>7}{r.attack.guesses:>8}{r.attack.correct:>7}"
        f"{r.epsilon_lower_bound:>10.3f}  {verdict}",
        flush=True,
    )


if __name__ == "__main__":
    main()
