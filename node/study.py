"""A study: what one node learns on its own data, and what that costs in privacy.

Why its own part: the model, the local trainer (DP-SGD), the privacy ledger and the data split
belong together, and several concurrent studies per node would each have their own. Nothing
here knows about peers, rounds on the network or HTTP: the round coordinator (node/rounds.py)
asks a study to train a round, evaluate, and report its spend.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from murmur.gossip.aggregation import dp_noise_norm
from murmur.gossip.noise_claims import NoiseClaim
from murmur.models.data import HospitalSplit, load_dataset, resolved_data_path
from murmur.models.nets import build_model
from murmur.models.optimizers import ServerOptimizer
from murmur.models.params import flatten, get_state, model_spec, set_state, state_sha256, unflatten
from murmur.models.personal import PersonalModel
from murmur.models.privacy import PrivacyLedger
from murmur.models.training import LocalTrainer, TrainingSettings, evaluate, learning_rate_at
from murmur.node.checkpoint import NodeCheckpoint
from murmur.node.config import NodeConfig
from murmur.node.state import StartupError

log = logging.getLogger("murmur.node")

State = dict[str, np.ndarray]


def load_splits(config: NodeConfig) -> list[HospitalSplit]:
    """Every hospital's split of the configured data set, as each node of the network loads
    it (the same seed, preprocessing and schema options everywhere)."""
    d = config.data
    return load_dataset(
        d.dataset,
        path=str(d.path) if d.path else None,
        num_hospitals=d.num_hospitals,
        seed=d.seed,
        alpha=d.alpha,
        label=d.label,
        site=d.site,
        test_fraction=d.test_fraction,
        preprocessing=d.resolved_preprocessing(config.privacy.enabled),
        reference=d.reference,
        positive=d.positive,
        not_identifying=tuple(d.not_identifying),
    )


def load_own_data(config: NodeConfig) -> HospitalSplit:
    """This hospital's split of the configured data set (StartupError naming the fix when the
    configured hospital is not in it)."""
    d = config.data
    splits = load_splits(config)
    names = [s.name for s in splits]
    if d.hospital in names:
        return splits[names.index(d.hospital)]
    if d.hospital.isdigit() and int(d.hospital) < len(splits):
        return splits[int(d.hospital)]
    raise StartupError(
        f"data.hospital {d.hospital!r} is not in dataset {d.dataset!r}; "
        f"fix: use one of {', '.join(names)} or an index 0..{len(splits) - 1}"
    )


def check_own_count(config: NodeConfig, n_train: int) -> None:
    """Under `weighting = "patients"` the count the manifest gives this hospital must be its
    training split's size: the neighbours weigh its model by that count (node/mixing.py)."""
    agg, own = config.aggregation, config.node.name
    if agg.weighting == "patients" and agg.patients.get(own) != n_train:
        raise StartupError(
            f"aggregation.patients.{own} = {agg.patients.get(own)} but this hospital's "
            f"training split has {n_train} patients; fix: propose the study with "
            f"{own} = {n_train} (the count its neighbours weigh its model by)"
        )


class Study:
    """One study on this node: its data, model, trainer and privacy ledger.

    Every node builds the same initial model from the shared seed, so round 1 averages models
    that started from the same point (as FedAvg does).
    """

    def __init__(self, config: NodeConfig, data: HospitalSplit) -> None:
        self.config = config
        self.data = data
        check_own_count(config, len(data.y_train))
        input_shape = tuple(data.x_train.shape[1:])
        model = config.model
        model_params = {"hidden": tuple(model.hidden)} if model.name == "mlp" else {}
        self.model = build_model(model.name, input_shape, config.training.seed, **model_params)
        self.initial_state: State = get_state(self.model)
        self.spec = model_spec(self.initial_state)
        settings = _settings(config)
        self.trainer = LocalTrainer(self.model, data.x_train, data.y_train, settings)
        # FedAdam/FedYogi/FedAdagrad on (aggregate - previous model), state kept here only.
        opt = config.server_optimizer
        self.server_optimizer = ServerOptimizer(opt.settings()) if opt.name != "none" else None
        # Ditto's personal model (models/personal.py): trained here, evaluated here, never sent.
        pers = config.personalization
        self.personal: PersonalModel | None = None
        if pers.method == "ditto":
            self.personal = PersonalModel(
                self.model,
                data.x_train,
                data.y_train,
                settings,
                mu=pers.mu,
                learning_rate=pers.learning_rate,
            )
        self.personal_metrics: dict[str, Any] = {}
        self.ledger: PrivacyLedger | None = None
        if config.privacy.enabled:
            p = config.privacy
            self.ledger = PrivacyLedger.plan(
                epsilon=p.epsilon,
                delta=p.delta,
                n_patients=len(data.y_train),
                sample_rate=self.trainer.sample_rate(),
                planned_steps=self.dp_steps_per_round() * config.training.rounds,
                max_grad_norm=p.max_grad_norm,
                accountant=p.accountant,
            )
            self._use_ledger(self.ledger)

    def dp_steps_per_round(self) -> int:
        """DP-SGD steps a round takes: the shared model's, plus the personal model's if any
        (both are charged to the one ledger, so one ε covers both)."""
        personal = self.personal.steps_per_round() if self.personal is not None else 0
        return self.trainer.steps_per_round() + personal

    def dp_noise_norm(self) -> float | None:
        """The expected length of the DP noise this round's training adds to the shared model
        (gossip/aggregation.py ``dp_noise_norm``), from this node's own ledger and trainer;
        None without DP or with an optimizer that rescales the noise (Adam, momentum)."""
        ledger, trainer = self.ledger, self.trainer
        settings = trainer.settings
        if ledger is None or settings.optimizer != "sgd" or settings.momentum != 0:
            return None
        return dp_noise_norm(
            ledger.noise_multiplier,
            ledger.max_grad_norm,
            trainer.expected_batch_size(),
            learning_rate_at(settings, max(trainer.rounds_trained - 1, 0)),
            trainer.steps_per_round(),
            self.trainable_parameters(),
        )

    def trainable_parameters(self) -> int:
        """The parameters DP-SGD adds noise to (the d of ``dp_noise_norm``)."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def noise_claim(self) -> NoiseClaim | None:
        """The DP noise parameters of the round just trained, announced with its model
        (gossip/noise_claims.py) so that neighbours measure it against its own noise; None
        exactly when ``dp_noise_norm`` is (no DP, or an optimizer that rescales the noise)."""
        ledger, trainer = self.ledger, self.trainer
        settings = trainer.settings
        if ledger is None or settings.optimizer != "sgd" or settings.momentum != 0:
            return None
        return NoiseClaim(
            noise_multiplier=float(ledger.noise_multiplier),
            max_grad_norm=float(ledger.max_grad_norm),
            sample_rate=float(trainer.sample_rate()),
            expected_batch_size=float(trainer.expected_batch_size()),
            steps=int(trainer.steps_per_round()),
            learning_rate=float(learning_rate_at(settings, max(trainer.rounds_trained - 1, 0))),
        )

    def _use_ledger(self, ledger: PrivacyLedger) -> None:
        self.trainer.ledger = ledger
        if self.personal is not None:
            self.personal.ledger = ledger

    # ------------------------------------------------------------ what it is

    def describe_data(self) -> dict[str, Any]:
        """The data set, the path it was really read from, and this hospital's split sizes."""
        d = self.config.data
        return {
            "dataset": d.dataset,
            "path": str(resolved_data_path(d.dataset, d.path)),
            "hospital": self.data.name,
            "n_train": len(self.data.y_train),
            "n_test": len(self.data.y_test),
        }

    def privacy_status(self) -> dict[str, Any]:
        """/status `privacy`: the ledger's report, or that DP is off."""
        if self.ledger is None:
            return {"enabled": False, "epsilon_spent": 0.0}
        return {"enabled": True, **self.ledger.report()}

    def privacy_line(self) -> str:
        """The budget in words for the start-up line."""
        if self.ledger is None:
            return "NO differential privacy"
        ledger = self.ledger
        return (
            f"DP-SGD ε={ledger.epsilon_budget:g} δ={ledger.delta:.3g} "
            f"(σ={ledger.noise_multiplier:.3f}, spent {ledger.epsilon_spent():.3f})"
        )

    def spend(self) -> tuple[int, float]:
        """(DP steps taken, ε spent): what this node's envelopes claim; both only grow."""
        if self.ledger is None:
            return 0, 0.0
        epsilon = max(0.0, float(self.ledger.epsilon_spent())) + 0.0  # never -0.0
        return int(self.ledger.steps_taken), epsilon

    def budget_spent(self) -> bool:
        """No DP step is left in the budget (always False without DP)."""
        return self.ledger is not None and self.ledger.remaining_steps() == 0

    def steps_after_round(self) -> int | None:
        """The ledger's steps once the next round is trained (the write-ahead intent), or
        None without DP."""
        if self.ledger is None:
            return None
        return self.ledger.steps_taken + self.dp_steps_per_round()

    # ------------------------------------------------------------ learning

    def state(self) -> State:
        return get_state(self.model)

    def load(self, state: State) -> None:
        set_state(self.model, state)

    def train_round(self, reference: State) -> bool:
        """Train one round from `reference` (the model the round started from); False, with
        the model put back to `reference`, when training diverged to NaN or inf (e.g. from a
        model that poisoned neighbours blew up): peers would refuse a NaN model."""
        self.trainer.train_round(reference)
        if self.personal is not None:  # Ditto: pulled towards the shared model of round start
            self.personal.train_round(reference)
        if all(np.isfinite(a).all() for a in get_state(self.model).values()):
            return True
        set_state(self.model, reference)
        return False

    def evaluate(self) -> dict[str, Any]:
        """Clinical metrics on the held-out split, at a threshold that never looks at the test
        rows. Under DP nothing published here is computed from training rows (docs/privacy.md):
        the threshold is fixed (Youden's J would be one training patient's score) and the
        majority baseline is the test split's own majority, not the training labels'."""
        d = self.data
        threshold = self.config.evaluation.resolved_threshold(self.config.privacy.enabled)
        if self.personal is not None:  # the personal model's metrics, beside the shared one's
            self.personal_metrics = self.personal.evaluate(
                d.x_train, d.y_train, d.x_test, d.y_test, threshold
            )
        return evaluate(self.model, d.x_train, d.y_train, d.x_test, d.y_test, threshold)

    # ------------------------------------------------------------ persistence

    def restore(self, ckpt: NodeCheckpoint, intent_steps: int) -> None:
        """Continue from a checkpoint. `intent_steps`: the write-ahead intent; when a node was
        killed mid-training, the steps of that round may have touched the data, so they count
        as spent even though their model was never saved."""
        set_state(self.model, ckpt.model_state)
        self.trainer.load_state_dict_bytes(ckpt.trainer_state)
        if self.ledger is not None and ckpt.privacy:
            self.ledger = PrivacyLedger.from_state(ckpt.privacy)
            self._use_ledger(self.ledger)
        if self.ledger is not None and intent_steps > self.ledger.steps_taken:
            self.ledger.record_steps(intent_steps - self.ledger.steps_taken)
        if self.server_optimizer is not None and "server_optimizer" in ckpt.extra:
            self.server_optimizer.load_state(ckpt.extra["server_optimizer"])
        if self.personal is not None and "personal" in ckpt.extra:
            self.personal.load_state(ckpt.extra["personal"])

    def checkpoint_parts(self) -> dict[str, Any]:
        """The study's share of a checkpoint (NodeCheckpoint's model, trainer and privacy)."""
        return {
            "model_state": get_state(self.model),
            "trainer_state": self.trainer.state_dict_bytes(),
            "privacy": self.ledger.to_state() if self.ledger else {},
        }

    def checkpoint_extra(self) -> dict[str, Any]:
        """The study's entries in a checkpoint's `extra`: the outer optimizer's moments and the
        personal model, when the study has them."""
        extra: dict[str, Any] = {}
        if self.server_optimizer is not None:
            extra["server_optimizer"] = self.server_optimizer.to_state()
        if self.personal is not None:
            extra["personal"] = self.personal.state()
        return extra

    # ------------------------------------------------------------ the outer step

    def outer_step(
        self, previous: State, aggregate: np.ndarray, record: dict[str, Any]
    ) -> np.ndarray:
        """The server optimizer's step on (aggregate - previous model), post-processing of DP
        outputs only (models/optimizers.py); the aggregate itself without one. The aggregation
        record then names the optimizer and the robust aggregate's hash (its result_sha256 is
        the stepped model's)."""
        if self.server_optimizer is None:
            return aggregate
        stepped = self.server_optimizer.step(flatten(previous), aggregate)
        if not np.isfinite(stepped).all():
            log.warning("server optimizer step not finite; keeping the robust aggregate")
            return aggregate
        record["server_optimizer"] = self.server_optimizer.settings.name
        record["aggregate_sha256"] = state_sha256(unflatten(aggregate, previous))
        return stepped


def _settings(config: NodeConfig) -> TrainingSettings:
    t = config.training
    return TrainingSettings(
        batch_size=t.batch_size,
        learning_rate=t.learning_rate,
        local_epochs=t.local_epochs,
        local_steps=t.local_steps,
        optimizer=t.optimizer,
        momentum=t.momentum,
        loss=t.loss,
        focal_gamma=t.focal_gamma,
        class_weighting=str(t.class_weighting),
        class_weights=_pair(t.class_weights),
        fedprox_mu=t.fedprox_mu,
        survival_loss=t.survival_loss,
        seed=t.seed + stable_int(config.node.name),
        augment=t.augment,
        lr_schedule=t.lr_schedule,
        schedule_rounds=t.rounds,
    )


def _pair(values: list[float] | None) -> tuple[float, float] | None:
    """A validated two-number config list as the (negative, positive) tuple training takes."""
    return None if values is None else (float(values[0]), float(values[1]))


def stable_int(text: str) -> int:
    """A small per-node integer from its name, stable across runs (Python's hash() is not)."""
    return int.from_bytes(text.encode()[:4].ljust(4, b"\0"), "little") % 10_000
