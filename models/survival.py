"""Survival analysis for a hospital's node: the Cox losses and Harrell's C-index.

A survival split's labels are two columns per patient, ``(time, event)``: days to death or
to last follow-up, and 1 if the death was observed (0 = censored). The model is the same
linear layer as logistic regression; its output is the patient's log relative hazard
(higher = shorter expected survival), so nothing in the node, the wire or the aggregation
knows which task runs: only the loss (`make_survival_loss`) and the evaluation
(`survival_metrics`) differ.

Two losses, because differential privacy needs one the partial likelihood is not:

- ``cox``: the Cox partial likelihood with Breslow's handling of tied times, over the
  patients of one training batch: patient i's term (if i died) is
  ``log sum_{j in batch, T_j >= T_i} exp(eta_j) - eta_i``. That term depends on every other
  patient in i's risk set, so one patient moves many patients' terms and per-sample clipping
  does not bound one patient's influence on the batch gradient. It is what training uses
  without DP, and it is refused under DP.
- ``exponential``: the full likelihood of the proportional-hazards model with a constant
  baseline hazard (Poisson regression with offset log T): patient i's term is
  ``exp(eta_i) t_i - d_i eta_i`` (t_i in units of `EXPOSURE_YEARS`), a function of
  patient i's own row only, so DP-SGD's clipping bounds each patient's influence at C
  exactly as for classification. The linear layer's bias is the log baseline hazard; the
  risk score, and so the
  C-index, uses the same ``eta``. docs/privacy.md, "Survival under DP", says why and what
  it costs.

The metric is Harrell's C as ``lifelines.utils.concordance_index(T, -risk, E)`` computes it
(tests/test_survival.py checks the two agree), with a patient-level bootstrap interval.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

SURVIVAL_LOSSES = ("auto", "cox", "exponential")
"""auto: cox (partial likelihood) without DP, exponential (per-patient likelihood) under DP."""

DAYS_PER_YEAR = 365.25
EXPOSURE_YEARS = 30.0
"""The exponential loss's unit of exposure, a public constant: in units of 30 years a
zero-initialised model starts at a hazard of 1/30 per year, the order of published
breast-cancer mortality, so the first DP steps are not spent moving the baseline. Chosen with
1 and 10 years on validation splits of the training rows (docs/results.md)."""
BOOTSTRAP_REPLICATES = 1000
CI_LEVEL = 0.95

SurvivalLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def is_survival_labels(y: np.ndarray | torch.Tensor) -> bool:
    """Labels of a survival split: shape (n, 2), columns (time, event)."""
    return y.ndim == 2 and y.shape[1] == 2


def check_survival_labels(y: np.ndarray | torch.Tensor, what: str = "labels") -> None:
    """Raise ValueError unless every time is finite and > 0 and every event is 0 or 1."""
    values = np.asarray(y.detach() if isinstance(y, torch.Tensor) else y, dtype=np.float64)
    if not is_survival_labels(values):
        raise ValueError(
            f"survival {what} must have shape (n, 2) (time, event), got {values.shape}"
        )
    times, events = values[:, 0], values[:, 1]
    if not (np.isfinite(times).all() and (times > 0).all()):
        raise ValueError(f"survival {what}: every time must be a finite number of days > 0")
    if not np.isin(events, (0.0, 1.0)).all():
        raise ValueError(f"survival {what}: every event must be 0 (censored) or 1 (death)")


def resolve_survival_loss(name: str, *, private: bool) -> str:
    """The loss that runs: "auto" picks by DP; "cox" under DP is refused (module docstring)."""
    if name not in SURVIVAL_LOSSES:
        raise ValueError(f"unknown survival_loss {name!r}: use one of {SURVIVAL_LOSSES}")
    if name == "auto":
        return "exponential" if private else "cox"
    if name == "cox" and private:
        raise ValueError(
            "survival_loss 'cox' (the partial likelihood) puts every patient in other "
            "patients' risk sets, so per-sample clipping does not bound one patient's "
            "influence and DP-SGD's guarantee would not hold; fix: use 'auto' or "
            "'exponential' under DP (docs/privacy.md, 'Survival under DP')"
        )
    return name


def make_survival_loss(name: str, *, private: bool) -> SurvivalLoss:
    """(risk (B,), labels (B, 2)) -> one loss per patient (B,), the loss `name` resolves to."""
    resolved = resolve_survival_loss(name, private=private)
    return cox_breslow_losses if resolved == "cox" else exponential_losses


def cox_breslow_losses(risk: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood terms over this batch, Breslow ties.

    Patient i (if it died) contributes ``logsumexp_{j: T_j >= T_i} eta_j - eta_i``; censored
    patients contribute 0 but sit in the risk sets. Summed, this is the batch's negative
    partial log-likelihood. Patients tied in time share a risk set that contains them all
    (Breslow's approximation).
    """
    eta = risk.reshape(-1)
    times, events = labels[:, 0], labels[:, 1]
    if len(eta) == 0:
        return eta
    at_risk = times.unsqueeze(0) >= times.unsqueeze(1)  # [i, j]: j is in i's risk set
    masked = torch.where(
        at_risk, eta.unsqueeze(0), torch.full_like(at_risk, -torch.inf, dtype=eta.dtype)
    )
    log_denominator = torch.logsumexp(masked, dim=1)
    return events * (log_denominator - eta)


def exponential_losses(risk: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of a constant-baseline proportional-hazards model, per patient.

    ``exp(eta_i) t_i - d_i eta_i`` (t in units of `EXPOSURE_YEARS`): the Poisson likelihood
    of d_i events over exposure t_i at rate exp(eta_i), up to a constant. Depends on patient
    i's row only.
    """
    eta = risk.reshape(-1)
    exposure, events = labels[:, 0] / (DAYS_PER_YEAR * EXPOSURE_YEARS), labels[:, 1]
    return torch.exp(eta) * exposure - events * eta


def predict_risk(model: torch.nn.Module, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """The model's log relative hazard per row (eval mode, no gradients; restores the mode)."""
    rows = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            chunks = [
                model(rows[i : i + batch_size]).reshape(-1) for i in range(0, len(rows), batch_size)
            ]
    finally:
        model.train(was_training)
    return torch.cat(chunks).numpy().astype(np.float64) if chunks else np.zeros(0)


def _pair_matrices(
    times: np.ndarray, risk: np.ndarray, events: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(comparable[i, j], concordance[i, j]) for Harrell's C.

    A pair is comparable when i died first (T_i < T_j, d_i = 1), or at the same time as a
    censored j (censored at T means alive at T); concordance is 1 when the earlier death had
    the higher risk, 1/2 on tied risks, as lifelines counts them.
    """
    t_i, t_j = times[:, None], times[None, :]
    died = events[:, None] == 1
    comparable = died & ((t_i < t_j) | ((t_i == t_j) & (events[None, :] == 0)))
    r_i, r_j = risk[:, None], risk[None, :]
    concordance = np.where(r_i > r_j, 1.0, np.where(r_i == r_j, 0.5, 0.0))
    return comparable.astype(np.float64), concordance


def concordance_index(times: np.ndarray, risk: np.ndarray, events: np.ndarray) -> float | None:
    """Harrell's C of a risk score (higher = earlier death); None with no comparable pair."""
    t, r, e = (np.asarray(a, dtype=np.float64).ravel() for a in (times, risk, events))
    if not len(t) == len(r) == len(e):
        raise ValueError(f"{len(t)} times, {len(r)} risks and {len(e)} events: one each")
    if not np.isfinite(r).all():
        raise ValueError("risk scores must be finite")
    comparable, concordance = _pair_matrices(t, r, e)
    pairs = comparable.sum()
    return float((comparable * concordance).sum() / pairs) if pairs else None


def concordance_interval(
    times: np.ndarray,
    risk: np.ndarray,
    events: np.ndarray,
    *,
    replicates: int = BOOTSTRAP_REPLICATES,
    seed: int = 0,
) -> tuple[float, float] | None:
    """A percentile bootstrap 95% interval for Harrell's C, resampling patients.

    Each replicate draws the test patients with replacement (multinomial weights w), so its
    C is w' (A * K) w / w' A w with A the comparable pairs and K the concordance: one matrix
    product per replicate instead of re-sorting. Replicates with no comparable pair are
    dropped; None when fewer than half of them are usable (too few events to say anything).
    """
    t, r, e = (np.asarray(a, dtype=np.float64).ravel() for a in (times, risk, events))
    if len(t) < 2 or e.sum() == 0:
        return None
    comparable, concordance = _pair_matrices(t, r, e)
    weights = np.random.default_rng(seed).multinomial(
        len(t), np.full(len(t), 1 / len(t)), size=replicates
    )
    weights = weights.astype(np.float64)
    pairs = np.einsum("bi,ij,bj->b", weights, comparable, weights)
    agree = np.einsum("bi,ij,bj->b", weights, comparable * concordance, weights)
    usable = pairs > 0
    if usable.sum() < replicates / 2:
        return None
    values = agree[usable] / pairs[usable]
    tail = (1 - CI_LEVEL) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def survival_metrics(y_test: np.ndarray, risk: np.ndarray) -> dict[str, float | int | None]:
    """What a survival node reports on its test split: size, deaths, Harrell's C and its CI.

    Keys: n, events, c_index, c_index_low, c_index_high. ``c_index`` is None when no pair of
    test patients is comparable (e.g. no death), never a made-up 0.5.
    """
    check_survival_labels(y_test, "test labels")
    times, events = y_test[:, 0], y_test[:, 1]
    interval = concordance_interval(times, risk, events)
    return {
        "n": len(times),
        "events": int(events.sum()),
        "c_index": concordance_index(times, risk, events),
        "c_index_low": interval[0] if interval else None,
        "c_index_high": interval[1] if interval else None,
    }
