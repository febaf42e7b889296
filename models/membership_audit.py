"""The release gate's membership-inference audit (issue #21): how well can an attacker who
holds the released model tell this hospital's training patients from its held-out ones?

The attack is Yeom et al.'s (2018) loss threshold: guess "member" when the model's loss on a
patient's record is low. Scored over every threshold it gives a ROC AUC (0.5: the model says
nothing about membership) and the TPR at a low FPR (Carlini et al. 2022: what an attacker
that must rarely be wrong achieves). Members are the hospital's training rows, non-members
its test rows, which come from the same distribution and were never trained on.

The gate: the release is refused when the attack AUC exceeds `MAX_ATTACK_AUC` (0.60). Why
0.60: a private model's AUC on a few hundred patients scatters around 0.5 with a standard
error near 0.03 (tests/test_membership_inference.py measured <= 0.55 at ε = 1), while a
model that memorised its training rows (no DP, many epochs, a wide net) scores well above
0.6. The gate uses the point estimate, not a confidence bound, so that a small test split
cannot excuse a leaky model; the 95% interval (Hanley and McNeil) is reported next to it. A
passed audit is evidence against gross memorisation, not a privacy proof: the guarantee is
DP's ε and δ (models/privacy.py), which the model card reports per hospital.

Pure apart from running the model: no I/O.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score, roc_curve

MAX_ATTACK_AUC = 0.60
LOW_FPR = 0.001  # the TPR is reported at this false-positive rate
ATTACK = "loss_threshold"
Z_95 = 1.959963984540054


@dataclass(frozen=True)
class MembershipAudit:
    """The audit's outcome at one hospital."""

    attack: str
    auc: float
    auc_low: float
    auc_high: float
    tpr_at_low_fpr: float
    low_fpr: float
    achieved_fpr: float  # the FPR the reported TPR really has (0 when too few non-members)
    n_members: int
    n_nonmembers: int
    max_auc: float
    passed: bool

    def as_dict(self) -> dict[str, float | int | str | bool]:
        return asdict(self)


def per_example_losses(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each patient's binary cross-entropy under ``model`` (eval mode, no gradients)."""
    labels = np.asarray(y)
    if labels.ndim != 1:
        raise ValueError(
            "the membership audit takes 0/1 labels; survival models are not audited yet"
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(torch.as_tensor(np.asarray(x), dtype=torch.float32)).reshape(-1)
            loss = F.binary_cross_entropy_with_logits(
                logits, torch.as_tensor(labels, dtype=torch.float32), reduction="none"
            )
    finally:
        model.train(was_training)
    return loss.numpy().astype(np.float64)


def _hanley_mcneil(auc: float, n_pos: int, n_neg: int) -> float:
    """The standard error of an AUC (Hanley and McNeil 1982)."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (
        n_pos * n_neg
    )
    return math.sqrt(max(var, 0.0))


def loss_threshold_audit(
    member_losses: np.ndarray, nonmember_losses: np.ndarray, max_auc: float = MAX_ATTACK_AUC
) -> MembershipAudit:
    """The attack's AUC and TPR at `LOW_FPR` from the two groups' losses; passed when the
    AUC is at most ``max_auc``."""
    members, others = np.asarray(member_losses), np.asarray(nonmember_losses)
    if len(members) < 2 or len(others) < 2:
        raise ValueError("the membership audit needs at least two members and two non-members")
    is_member = np.r_[np.ones(len(members)), np.zeros(len(others))]
    score = -np.r_[members, others]  # low loss: "member"
    auc = float(roc_auc_score(is_member, score))
    se = _hanley_mcneil(auc, len(members), len(others))
    fpr, tpr, _ = roc_curve(is_member, score)
    within = fpr <= LOW_FPR
    return MembershipAudit(
        attack=ATTACK,
        auc=auc,
        auc_low=max(0.0, auc - Z_95 * se),
        auc_high=min(1.0, auc + Z_95 * se),
        tpr_at_low_fpr=float(tpr[within].max()),
        low_fpr=LOW_FPR,
        achieved_fpr=float(fpr[within][np.argmax(tpr[within])]),
        n_members=len(members),
        n_nonmembers=len(others),
        max_auc=max_auc,
        passed=auc <= max_auc,
    )


def audit_model(
    model: torch.nn.Module,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    max_auc: float = MAX_ATTACK_AUC,
) -> MembershipAudit:
    """The loss-threshold audit of ``model`` on one hospital's training and test rows."""
    return loss_threshold_audit(
        per_example_losses(model, x_train, y_train),
        per_example_losses(model, x_test, y_test),
        max_auc,
    )
