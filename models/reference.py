"""A tuned reference the federated result must also be read against: scikit-learn's L2
logistic regression on the pooled training rows, its regularisation chosen by
cross-validation on those rows only.

murmur's own pooled baseline trains murmur's model with murmur's optimiser for as many
epochs as the network did; a badly tuned recipe makes it, and the federation, look better
than they are against what a statistician would fit in one line. Measured before this
existed: 0.04 to 0.08 AUC above murmur's pooled baseline on a real multi-site CSV, 0.851 vs
0.835 on Fed-Heart-Disease. So this reference fits ``LogisticRegressionCV`` (L2, 20 values of
C on a log grid, 5-fold stratified cross-validation scored by AUC, on training rows only:
never a test row) and is evaluated as every baseline is (`models.baselines`): on each
hospital's test split, at a threshold chosen by Youden's J on that hospital's training rows.

It is trained without DP: a ceiling, not a competitor at the same ε. scikit-learn is
imported here only, so nodes never load it (models/splitting.py says why).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from murmur.models.data import HospitalSplit
from murmur.models.metrics import clinical_metrics
from murmur.models.training import choose_threshold

C_GRID = 20
FOLDS = 5


def reference_baseline(splits: Sequence[HospitalSplit], seed: int) -> dict[str, Any]:
    """Fit the tuned L2 logistic regression on all hospitals' training rows; evaluate it at
    each hospital. Returns `{"mean_auc", "C", "hospitals": [...]}` like `models.baselines`."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    x = np.concatenate([s.x_train for s in splits]).reshape(sum(len(s.y_train) for s in splits), -1)
    y = np.concatenate([s.y_train for s in splits]).astype(int)
    folds = StratifiedKFold(
        n_splits=min(FOLDS, int(np.bincount(y).min())), shuffle=True, random_state=seed
    )
    model = LogisticRegressionCV(
        Cs=C_GRID,
        cv=folds,
        scoring="roc_auc",
        max_iter=5000,
        random_state=seed,
        l1_ratios=(0.0,),  # pure L2
        use_legacy_attributes=False,
    ).fit(x, y)
    entries = []
    for split in splits:
        train_p = model.predict_proba(split.x_train.reshape(len(split.y_train), -1))[:, 1]
        test_p = model.predict_proba(split.x_test.reshape(len(split.y_test), -1))[:, 1]
        threshold = choose_threshold(split.y_train, train_p)
        metrics = clinical_metrics(split.y_test, test_p, threshold, y_train=split.y_train)
        entries.append(
            {"name": split.name, **metrics, "n_train": len(y), "n_test": len(split.y_test)}
        )
    aucs = [e["auc"] for e in entries if e["auc"] is not None]
    return {
        "mean_auc": float(np.mean(aucs)) if aucs else None,
        "C": float(np.ravel(model.C_)[0]),
        "hospitals": entries,
    }
