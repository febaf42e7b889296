"""The release gate's membership-inference audit (models/membership_audit.py): a model that
memorised its training patients (no DP, a wide net, many epochs, noisy labels) is blocked at
the documented threshold, and the same training under DP-SGD at ε = 1 passes."""

from __future__ import annotations

import numpy as np
import pytest
from murmur.models.membership_audit import (
    MAX_ATTACK_AUC,
    audit_model,
    loss_threshold_audit,
)

from tests.test_membership_inference import trained_on_noisy_labels


def trained(seed: int, epsilon: float | None):  # type: ignore[no-untyped-def]
    model, data, _ = trained_on_noisy_labels(seed, epsilon)
    return model, data


@pytest.mark.parametrize("seed", [0, 1])
def test_an_overfit_model_without_dp_is_blocked_and_the_dp_model_passes(seed: int) -> None:
    plain, data = trained(seed, None)
    blocked = audit_model(plain, *data)
    assert blocked.auc > MAX_ATTACK_AUC and not blocked.passed, blocked
    assert blocked.auc_low > 0.6  # clearly above, not by chance
    private, data = trained(seed, 1.0)
    passed = audit_model(private, *data)
    assert passed.auc <= MAX_ATTACK_AUC and passed.passed, passed
    assert passed.n_members == len(data[1]) and passed.n_nonmembers == len(data[3])


def test_the_attack_scores_what_it_should() -> None:
    rng = np.random.default_rng(0)
    same = loss_threshold_audit(rng.exponential(size=500), rng.exponential(size=500))
    assert abs(same.auc - 0.5) < 0.06 and same.passed
    leaky = loss_threshold_audit(np.full(300, 0.01) + rng.random(300) * 0.01, rng.random(300) + 1)
    assert leaky.auc == 1.0 and not leaky.passed
    assert leaky.tpr_at_low_fpr == 1.0 and leaky.achieved_fpr == 0.0
    with pytest.raises(ValueError, match="at least two"):
        loss_threshold_audit(np.zeros(1), np.zeros(5))
