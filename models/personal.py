"""A personalized model per hospital, kept next to the shared one and never sent (Ditto).

Li et al., "Ditto: Fair and Robust Federated Learning Through Personalization" (ICML 2021):
besides the shared model w that gossip averages, each hospital trains its own model v on its
own rows with the objective

    F_k(v) + (mu / 2) ||v - w||^2

where w is the shared model the round started from. mu = 0 is local-only training, a large mu
pins v to w; in between, v keeps what is particular to the site (Switzerland's and the VA's
case mix in Fed-Heart-Disease) while borrowing strength from the network. Sites that differ
from the rest can report the better of the two; both are evaluated and reported.

The personalized model never leaves the node: it is not in any envelope, checkpoint sent
anywhere, or status field other than its metrics. Under DP it is trained with DP-SGD on the
node's one privacy ledger, whose noise was planned for the shared and the personal steps
together, so the hospital's ε still covers everything computed from its training rows
(docs/privacy.md, "Personalization").
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
from murmur.models.params import get_state, set_state
from murmur.models.privacy import PrivacyLedger
from murmur.models.training import LocalTrainer, TrainingSettings, evaluate
from torch import nn

PERSONALIZATION_METHODS: tuple[str, ...] = ("none", "ditto")


class PersonalModel:
    """Ditto's personal model v of one hospital: trained each round towards the shared w."""

    def __init__(
        self,
        shared: nn.Module,
        x_train: np.ndarray,
        y_train: np.ndarray,
        settings: TrainingSettings,
        *,
        mu: float,
        learning_rate: float | None = None,
    ) -> None:
        if not mu >= 0:
            raise ValueError(f"personalization mu must be >= 0, got {mu}")
        self.model = copy.deepcopy(shared)  # starts where the shared model starts
        personal = replace(
            settings,
            fedprox_mu=mu,
            learning_rate=learning_rate or settings.learning_rate,
            seed=settings.seed + 1,  # its own batches without DP
        )
        self.trainer = LocalTrainer(self.model, x_train, y_train, personal)

    @property
    def ledger(self) -> PrivacyLedger | None:
        return self.trainer.ledger

    @ledger.setter
    def ledger(self, ledger: PrivacyLedger | None) -> None:
        self.trainer.ledger = ledger  # the node's one ledger: one ε for both models

    def steps_per_round(self) -> int:
        return self.trainer.steps_per_round()

    def train_round(self, shared_state: Mapping[str, np.ndarray]) -> None:
        """One round of local training, pulled towards ``shared_state`` (Ditto's w)."""
        self.trainer.train_round(reference_state=shared_state)

    def evaluate(
        self,
        x_train: np.ndarray,
        y_train: np.ndarray,
        x_test: np.ndarray,
        y_test: np.ndarray,
        threshold: float | None,
    ) -> dict[str, Any]:
        return evaluate(self.model, x_train, y_train, x_test, y_test, threshold)

    def state(self) -> dict[str, Any]:
        """For the node's own checkpoint (which never leaves the node)."""
        return {
            "model": {k: v.tobytes() for k, v in get_state(self.model).items()},
            "trainer": self.trainer.state_dict_bytes(),
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        current = get_state(self.model)
        raw = state.get("model", {})
        if set(raw) != set(current):
            raise ValueError("personal model state does not fit this model; checkpoint damaged")
        restored = {
            k: np.frombuffer(raw[k], dtype=current[k].dtype).reshape(current[k].shape).copy()
            for k in current
        }
        set_state(self.model, restored)
        self.trainer.load_state_dict_bytes(state["trainer"])
