"""The sections of a node's config that say what it learns and how privately: [data], [model],
[training], [privacy], [evaluation], [aggregation], [server_optimizer], [personalization],
[trust] and [adversary] (docs/config.md).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from murmur.gossip.trust import TrustSettings
from murmur.models.metrics import DP_DEFAULT_THRESHOLD
from murmur.models.optimizers import SERVER_OPTIMIZERS, ServerOptimizerSettings
from murmur.node.config_errors import (
    ConfigError,
    require,
)
from murmur.node.mixing import DEFAULT_MAX_WEIGHT, METROPOLIS, PATIENTS, WEIGHTINGS

# Kept here, not imported from models/, so reading a config does not import torch.
CLASS_WEIGHTING = ("auto", "balanced", "none")
PREPROCESSING = ("auto", "fitted", "reference")
DATASETS = ("breast-cancer", "heart-disease", "medmnist", "csv", "tcga-brca")  # models.data
MODEL_NAMES = (  # models.nets (tests/test_nets.py checks the two agree)
    "logreg",
    "mlp",
    "cnn",
    "cnn_gn",
    "multimodal",
    "cox",
    "resnet18",
    "resnet18_25m",
)
SURVIVAL_LOSSES = ("auto", "cox", "exponential")  # models.survival


@dataclass(frozen=True)
class DataSection:
    dataset: str = "breast-cancer"
    path: Path | None = None
    hospital: str = ""
    num_hospitals: int = 4
    seed: int = 0
    alpha: float | None = None
    label: str | None = None
    site: str | None = None
    test_fraction: float = 0.25
    # How features are scaled and imputed: "fitted" on this hospital's training rows, or from
    # public "reference" constants (built in, or the csv `reference` file). "auto": fitted
    # without DP, reference under DP, where fitted statistics are refused (docs/privacy.md).
    preprocessing: str = "auto"
    reference: Path | None = None  # csv only: column,kind,center,scale,fill (docs/data.md)
    # The label value that means disease: an R factor's "1_yes" (csv), or "0" for a MedMNIST
    # set whose 1 means benign. Default: 1 / yes / true / positive.
    positive: str | None = None
    # csv columns that look like identifiers (models/identifiers.py) but identify no one.
    not_identifying: list[str] = field(default_factory=list)

    def resolved_preprocessing(self, private: bool) -> str:
        """ "fitted" or "reference": what "auto" means with or without DP."""
        if self.preprocessing == "auto":
            return "reference" if private else "fitted"
        return self.preprocessing

    def validate(self) -> None:
        known = DATASETS
        require(
            self.dataset in known,
            "data.dataset",
            f"unknown dataset {self.dataset!r}",
            f"use one of {', '.join(known)}",
        )
        require(self.hospital != "", "data.hospital", "is required", 'hospital = "hospital_0"')
        require(self.num_hospitals >= 1, "data.num_hospitals", "must be >= 1", "num_hospitals = 4")
        if self.alpha is not None:
            require(
                self.alpha > 0,
                "data.alpha",
                "must be > 0 (omit it for an IID split)",
                "alpha = 0.5",
            )
        require(
            0 < self.test_fraction < 1,
            "data.test_fraction",
            "must be in (0, 1)",
            "test_fraction = 0.25",
        )
        if self.dataset == "csv":
            require(
                self.path is not None,
                "data.path",
                "is required for dataset = 'csv'",
                'path = "site_data.csv"',
            )
            require(
                self.label is not None,
                "data.label",
                "is required for dataset = 'csv'",
                'label = "outcome"',
            )
        require(
            self.preprocessing in PREPROCESSING,
            "data.preprocessing",
            f"unknown preprocessing {self.preprocessing!r}",
            f"use one of {', '.join(PREPROCESSING)}",
        )
        if self.positive is not None:
            require(
                self.dataset in ("csv", "medmnist"),
                "data.positive",
                f"only applies to csv and medmnist ({self.dataset!r} defines its own labels)",
                "remove positive",
            )
            require(
                self.dataset != "medmnist" or self.positive in ("0", "1"),
                "data.positive",
                'must be the MedMNIST label code "0" or "1"',
                'positive = "0"',
            )
        require(
            not self.not_identifying or self.dataset == "csv",
            "data.not_identifying",
            f"only applies to dataset = 'csv', not {self.dataset!r}",
            "remove not_identifying",
        )
        if self.reference is not None:
            require(
                self.dataset == "csv",
                "data.reference",
                f"only applies to dataset = 'csv' ({self.dataset!r} ships its own constants)",
                "remove reference",
            )
        if self.dataset == "csv" and self.preprocessing == "reference":
            require(
                self.reference is not None,
                "data.reference",
                "is required for preprocessing = \"reference\" with dataset = 'csv'",
                'reference = "reference.csv" (columns column,kind,center,scale,fill)',
            )


@dataclass(frozen=True)
class ModelSection:
    name: str = "logreg"
    hidden: list[int] = field(default_factory=lambda: [64, 32])

    def validate(self) -> None:
        known = MODEL_NAMES
        require(
            self.name in known,
            "model.name",
            f"unknown model {self.name!r}",
            f"use one of {', '.join(known)}",
        )
        require(
            all(h >= 1 for h in self.hidden),
            "model.hidden",
            "sizes must be >= 1",
            "hidden = [64, 32]",
        )


@dataclass(frozen=True)
class TrainingSection:
    rounds: int = 20
    local_epochs: int = 1
    local_steps: int = 0  # > 0: steps per round instead of local_epochs epochs
    batch_size: int = 32
    learning_rate: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.0
    loss: str = "bce"
    focal_gamma: float = 2.0
    # "auto": balanced n / (2 n_class) without DP, none under DP; "balanced" (refused under
    # DP); "none". Older configs' true / false mean "balanced" / "none".
    class_weighting: str | bool = "auto"
    class_weights: list[float] | None = None  # fixed [w_neg, w_pos]: data-independent, DP-safe
    fedprox_mu: float = 0.0
    # Survival data only: "auto" (Cox partial likelihood without DP, the per-patient
    # exponential likelihood under DP), "cox" (refused under DP) or "exponential".
    survival_loss: str = "auto"
    seed: int = 0
    augment: str = "none"  # "shift": random translation by up to 2 pixels (images)
    lr_schedule: str = "constant"  # "cosine": decays over the planned rounds (no privacy cost)

    def __post_init__(self) -> None:
        if isinstance(self.class_weighting, bool):
            object.__setattr__(
                self, "class_weighting", "balanced" if self.class_weighting else "none"
            )

    def validate(self) -> None:
        require(self.rounds >= 1, "training.rounds", "must be >= 1", "rounds = 20")
        require(self.local_epochs >= 1, "training.local_epochs", "must be >= 1", "local_epochs = 1")
        require(
            self.local_steps >= 0,
            "training.local_steps",
            "must be >= 0 (0: whole epochs)",
            "local_steps = 4, or omit it",
        )
        require(self.batch_size >= 1, "training.batch_size", "must be >= 1", "batch_size = 32")
        require(
            self.learning_rate > 0, "training.learning_rate", "must be > 0", "learning_rate = 0.05"
        )
        require(
            self.optimizer in ("sgd", "adam"),
            "training.optimizer",
            "unknown optimizer",
            'use "sgd" or "adam"',
        )
        require(0 <= self.momentum < 1, "training.momentum", "must be in [0, 1)", "momentum = 0.9")
        require(
            self.loss in ("bce", "focal"), "training.loss", "unknown loss", 'use "bce" or "focal"'
        )
        require(self.fedprox_mu >= 0, "training.fedprox_mu", "must be >= 0", "fedprox_mu = 0.01")
        require(
            self.survival_loss in SURVIVAL_LOSSES,
            "training.survival_loss",
            f"unknown survival loss {self.survival_loss!r}",
            f"use one of {', '.join(SURVIVAL_LOSSES)}",
        )
        require(
            self.class_weighting in CLASS_WEIGHTING,
            "training.class_weighting",
            f"unknown class weighting {self.class_weighting!r}",
            'use "auto", "balanced" or "none", or fixed class_weights = [1.0, 2.0]',
        )
        if self.class_weights is not None:
            require(
                len(self.class_weights) == 2
                and all(math.isfinite(w) and w > 0 for w in self.class_weights),
                "training.class_weights",
                f"must be two numbers > 0, [negative, positive] (got {self.class_weights})",
                "class_weights = [1.0, 2.0]",
            )
            require(
                self.class_weighting == "auto",
                "training.class_weights",
                f"conflicts with class_weighting = {self.class_weighting!r}",
                "remove class_weighting (fixed weights replace it) or remove class_weights",
            )


@dataclass(frozen=True)
class PrivacySection:
    enabled: bool = True
    epsilon: float = 1.0
    delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = "pld"
    # The smallest training set a site of the study may have: bounds the DP noise a
    # neighbour may announce (node/noise_plan.py). None: a neighbour is never measured with
    # more noise than this node's own.
    min_site_patients: int | None = None

    def validate(self) -> None:
        if not self.enabled:
            return
        if self.min_site_patients is not None:
            require(
                self.min_site_patients >= 1,
                "privacy.min_site_patients",
                "must be >= 1 (training rows)",
                "min_site_patients = 50 (the smallest site of the study), or omit it",
            )
        require(
            self.epsilon > 0, "privacy.epsilon", "must be > 0", "epsilon = 1.0 (or enabled = false)"
        )
        if self.delta is not None:
            require(
                0 < self.delta < 1, "privacy.delta", "must be in (0, 1)", "delta = 1e-5, or omit it"
            )
        require(
            self.max_grad_norm > 0, "privacy.max_grad_norm", "must be > 0", "max_grad_norm = 1.0"
        )
        require(
            self.accountant in ("pld", "rdp"),
            "privacy.accountant",
            f"unknown accountant {self.accountant!r}",
            'use "pld" or "rdp"',
        )


@dataclass(frozen=True)
class EvaluationSection:
    """How the node evaluates its model on its held-out split (the metrics it reports)."""

    # The decision threshold. Omitted: Youden's J on the training rows without DP; under DP 0.5,
    # because Youden's threshold is one training patient's score and metrics are published.
    threshold: float | None = None

    def resolved_threshold(self, private: bool) -> float | None:
        """The fixed threshold to use, or None for Youden's J on the training rows."""
        if self.threshold is not None:
            return self.threshold
        return DP_DEFAULT_THRESHOLD if private else None

    def validate(self) -> None:
        if self.threshold is not None:
            require(
                0 <= self.threshold <= 1,
                "evaluation.threshold",
                "must be in [0, 1]",
                "threshold = 0.5, or omit it",
            )


@dataclass(frozen=True)
class AggregationSection:
    """The robust rule and its f, and how the rules that weigh inputs (mean, clipping) weigh
    them: Metropolis-Hastings on the degrees, or by the patient counts in `patients` (public
    metadata the study manifest fixes; node/mixing.py), each neighbour capped at
    `max_weight`."""

    rule: str = "clipping"
    f: int = 0
    params: dict[str, float] = field(default_factory=dict)
    weighting: str = METROPOLIS  # metropolis | patients
    patients: dict[str, int] = field(default_factory=dict)  # hospital -> training patients
    max_weight: float = DEFAULT_MAX_WEIGHT  # no neighbour weighs more (weighting = patients)

    def validate(self) -> None:
        from murmur.gossip.aggregation import AGGREGATORS

        require(
            self.rule in AGGREGATORS,
            "aggregation.rule",
            f"unknown rule {self.rule!r}",
            f"use one of {', '.join(sorted(AGGREGATORS))}",
        )
        require(self.f >= 0, "aggregation.f", "must be >= 0", "f = 1")
        require(
            self.weighting in WEIGHTINGS,
            "aggregation.weighting",
            f"unknown weighting {self.weighting!r}",
            f"use one of {', '.join(WEIGHTINGS)}",
        )
        for name, count in self.patients.items():
            require(
                count >= 1,
                f"aggregation.patients.{name}",
                f"= {count}: a patient count must be >= 1",
                "give the hospital's number of training patients",
            )
        if self.weighting != PATIENTS:
            return
        require(
            self.rule in ("mean", "clipping"),
            "aggregation.weighting",
            f'= "patients" changes only the weights of mean and clipping, not {self.rule!r}',
            'use rule = "mean" or "clipping", or omit weighting',
        )
        require(
            0 < self.max_weight <= 1,
            "aggregation.max_weight",
            f"= {self.max_weight}: must be in (0, 1]",
            f"max_weight = {DEFAULT_MAX_WEIGHT:.3f}",
        )
        require(
            self.f * self.max_weight < 0.5,
            "aggregation.max_weight",
            f"= {self.max_weight}: f = {self.f} neighbours at the cap would hold half the "
            "mixing weight or more, so Byzantine inputs could outweigh the honest ones",
            f"max_weight below {0.5 / max(self.f, 1):.3f} (1 / (2 f))",
        )

    def check_counts(self, own: str, peers: list[str]) -> None:
        """Under `weighting = "patients"`, every node of the allowlist needs a count: a missing
        one would weigh 0, which for a configured peer is a mistake to refuse, not a default."""
        if self.weighting != PATIENTS:
            return
        for name in [own, *peers]:
            require(
                name in self.patients,
                f"aggregation.patients.{name}",
                'is missing: weighting = "patients" needs every hospital\'s training-patient count',
                f"add {name} = N to [aggregation] patients in the signed study manifest (the "
                "public count, as FLamby publishes it), or omit weighting",
            )


@dataclass(frozen=True)
class ServerOptimizerSection:
    """An optional FedAdam/FedYogi/FedAdagrad step each node applies to (its robust aggregate
    - its previous model); models/optimizers.py. Post-processing of DP outputs: no privacy cost."""

    name: str = "none"  # none | adam | yogi | adagrad
    learning_rate: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def validate(self) -> None:
        require(
            self.name in SERVER_OPTIMIZERS,
            "server_optimizer.name",
            f"unknown server optimizer {self.name!r}",
            f"use one of {', '.join(SERVER_OPTIMIZERS)}",
        )
        try:
            self.settings()
        except ValueError as exc:
            raise ConfigError(
                f"[server_optimizer] {exc}; fix: e.g. learning_rate = 0.01, beta1 = 0.9, "
                "beta2 = 0.99, tau = 0.001"
            ) from None

    def settings(self) -> ServerOptimizerSettings:
        return ServerOptimizerSettings(
            self.name, self.learning_rate, self.beta1, self.beta2, self.tau
        )


@dataclass(frozen=True)
class PersonalizationSection:
    """An optional personalized model per hospital that never leaves the node
    (models/personal.py): "ditto" trains it on local rows pulled towards the shared model."""

    method: str = "none"  # none | ditto
    mu: float = 0.1  # Ditto's lambda: (mu / 2) ||v - w_shared||^2
    learning_rate: float | None = None  # default: training.learning_rate

    def validate(self) -> None:
        require(
            self.method in ("none", "ditto"),
            "personalization.method",
            f"unknown method {self.method!r}",
            'use "none" or "ditto"',
        )
        require(self.mu >= 0, "personalization.mu", "must be >= 0", "mu = 0.1")
        if self.learning_rate is not None:
            require(
                self.learning_rate > 0,
                "personalization.learning_rate",
                "must be > 0",
                "learning_rate = 0.05, or omit it to use training.learning_rate",
            )


@dataclass(frozen=True)
class TrustSection(TrustSettings):
    """Per-peer trust scores (gossip/trust.py, docs/robustness.md): the fields and defaults are
    TrustSettings' own, so the config cannot drift from what the tracker uses."""

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as exc:
            raise ConfigError(
                f"[trust] {exc}; fix: omit the section for the defaults "
                "(decay 0.7, tolerance 3, cutoff 6, downweight_below 0.5, quarantine_below 0.2, "
                "max_relative_distance 1.5, under DP at least 4 x the DP noise length)"
            ) from None

    def validate(self) -> None:
        """Checked when the section is built (TrustSettings.__post_init__)."""

    def settings(self) -> TrustSettings:
        """The tracker's plain settings value (without the config-only methods)."""
        return TrustSettings(**dataclasses.asdict(self))


@dataclass(frozen=True)
class AdversarySection:
    """Turns this node into a Byzantine attacker. For tests and demos only, never on by default:
    `run_cluster.py --byzantine K --attack NAME` writes it (docs/robustness.md)."""

    attack: str = ""
    params: dict[str, float] = field(default_factory=dict)
    colluders: list[str] = field(default_factory=list)
    seed: int = 0
    # For dissensus: how many Byzantine neighbours each honest neighbour has.
    byzantine_neighbours: dict[str, int] = field(default_factory=dict)
    # What it does in the consensus phase (gossip/consensus_attacks.py); it may train
    # honestly (attack = "") and attack only there.
    consensus_attack: str = ""
    # The DP noise its crafted models announce (node/noise_plan.py): "loudest", the most the
    # plan accepts (widest own-model limit, strictest twin check), or "own", its own
    # training's claim.
    noise_claim: str = "loudest"

    @property
    def enabled(self) -> bool:
        return self.attack != ""

    def validate(self) -> None:
        if self.consensus_attack:
            from murmur.gossip.consensus_attacks import CONSENSUS_ATTACKS

            require(
                self.consensus_attack in CONSENSUS_ATTACKS,
                "adversary.consensus_attack",
                f"unknown consensus attack {self.consensus_attack!r}",
                f"use one of {', '.join(CONSENSUS_ATTACKS)}, or remove it",
            )
        require(
            self.noise_claim in ("loudest", "own"),
            "adversary.noise_claim",
            f"unknown noise claim {self.noise_claim!r}",
            'use "loudest" or "own"',
        )
        if not self.enabled:
            return
        from murmur.gossip.attacks import ATTACKS, attack_params

        require(
            self.attack in ATTACKS,
            "adversary.attack",
            f"unknown attack {self.attack!r}",
            f"use one of {', '.join(ATTACKS)}, or remove [adversary]",
        )
        try:
            attack_params(self.attack, self.params)
        except ValueError as exc:
            raise ConfigError(f"adversary.params: {exc}") from None
