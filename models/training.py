"""One hospital's local training: losses for imbalanced labels, FedProx, DP-SGD, the threshold.

A round is `local_epochs` passes over the hospital's training rows (or `local_steps` steps,
for models too large for whole epochs on a CPU). Each step draws a
Poisson-sampled batch (every patient is included independently with probability q, the
sampling DP-SGD's accountant assumes) and averages over the *expected* batch size q n, with or
without DP, so the learning rate means the same thing either way and the DP and plain paths
differ only in how the gradient is made (benchmarked in bench/dp.py).

With a `PrivacyLedger` the trainer takes DP-SGD steps (models/privacy.py), charges the ledger
before each one, and stops rather than exceed the budget. Each DP step draws its batch from a
fresh `privacy.private_generator()`, and nothing about that randomness is saved. Under DP the
loss uses no statistic of the training rows (`loss_weights`). See docs/privacy.md.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from murmur.models import privacy
from murmur.models.augment import AUGMENTATIONS, augment_batch
from murmur.models.dp_sgd import DPSGDGradient, PerSampleLoss
from murmur.models.local_sgd import Optimizer, SGDStep
from murmur.models.privacy import BudgetExhausted, PrivacyLedger
from murmur.models.survival import (
    SURVIVAL_LOSSES,
    check_survival_labels,
    is_survival_labels,
    make_survival_loss,
    predict_risk,
    survival_metrics,
)
from torch import nn

OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("constant", "cosine")
LOSSES = ("bce", "focal")
CLASS_WEIGHTING = ("auto", "balanced", "none")
"""auto: balanced without DP, none under DP. balanced: n / (2 n_class) from the training labels,
refused under DP. none: every patient weighs 1. Fixed weights are `class_weights`."""


@dataclass(frozen=True)
class TrainingSettings:
    """How a hospital trains locally. Defaults match node/config.py's [training] section."""

    batch_size: int = 32  # expected batch size; the Poisson rate is 1 / ceil(n / batch_size)
    learning_rate: float = 0.05
    local_epochs: int = 1
    # > 0: a round is this many steps instead of local_epochs epochs (the Poisson rate, hence
    # each step's privacy cost, stays the same; the accountant counts the steps it is told).
    local_steps: int = 0
    optimizer: str = "sgd"  # "sgd" (with `momentum`) or "adam"
    momentum: float = 0.0
    loss: str = "bce"  # "bce" or "focal" (Lin et al. 2017)
    focal_gamma: float = 2.0
    class_weighting: str = "auto"  # one of CLASS_WEIGHTING; see `loss_weights`
    # Fixed (negative, positive) loss weights, e.g. from a published prevalence: data-independent,
    # so allowed under DP. Needs class_weighting "auto".
    class_weights: tuple[float, float] | None = None
    fedprox_mu: float = 0.0  # FedProx proximal term (mu / 2) ||w - w_ref||^2; 0 turns it off
    survival_loss: str = "auto"  # survival labels only: models/survival.py SURVIVAL_LOSSES
    seed: int = 0  # batch sampling without DP (DP draws from privacy.private_generator())
    augment: str = "none"  # one of models.augment.AUGMENTATIONS (images only)
    # "cosine": round t of `schedule_rounds` trains at lr (1 + cos(pi t / schedule_rounds)) / 2.
    # It depends on the round number only, so it costs no privacy.
    lr_schedule: str = "constant"
    schedule_rounds: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
        if self.local_epochs < 1:
            raise ValueError(f"local_epochs must be >= 1, got {self.local_epochs}")
        if self.local_steps < 0:
            raise ValueError(f"local_steps must be >= 0, got {self.local_steps}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}: use one of {OPTIMIZERS}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augment {self.augment!r}: use one of {AUGMENTATIONS}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}: use one of {LR_SCHEDULES}")
        if self.lr_schedule != "constant" and self.schedule_rounds < 1:
            raise ValueError(
                f"lr_schedule {self.lr_schedule!r} needs schedule_rounds >= 1 (the planned rounds)"
            )
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}: use one of {LOSSES}")
        if not self.focal_gamma >= 0:
            raise ValueError(f"focal_gamma must be >= 0, got {self.focal_gamma}")
        if not (math.isfinite(self.fedprox_mu) and self.fedprox_mu >= 0):
            raise ValueError(f"fedprox_mu must be a finite number >= 0, got {self.fedprox_mu}")
        if self.survival_loss not in SURVIVAL_LOSSES:
            raise ValueError(
                f"unknown survival_loss {self.survival_loss!r}: use one of {SURVIVAL_LOSSES}"
            )
        if self.class_weighting not in CLASS_WEIGHTING:
            raise ValueError(
                f"unknown class_weighting {self.class_weighting!r}: use one of {CLASS_WEIGHTING}"
            )
        if self.class_weights is not None:
            if len(self.class_weights) != 2 or not all(
                math.isfinite(w) and w > 0 for w in self.class_weights
            ):
                raise ValueError(
                    f"class_weights must be two finite numbers > 0 (negative, positive), got "
                    f"{self.class_weights}"
                )
            if self.class_weighting != "auto":
                raise ValueError(
                    f"class_weights {self.class_weights} conflict with class_weighting "
                    f"{self.class_weighting!r}; fix: give one of the two"
                )


@dataclass(frozen=True)
class RoundStats:
    """What one round did. `mean_loss` is computed from raw training rows: it is a local
    diagnostic, NOT differentially private, and must not be shared with peers."""

    steps: int
    samples: int
    mean_loss: float
    epsilon_spent: float | None  # None without DP
    budget_exhausted: bool = False  # True if the round stopped early at the budget


def learning_rate_at(settings: TrainingSettings, round_index: int) -> float:
    """The learning rate of round ``round_index`` (0-based) under the settings' schedule."""
    if settings.lr_schedule == "constant":
        return settings.learning_rate
    progress = min(max(round_index, 0), settings.schedule_rounds) / settings.schedule_rounds
    return settings.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


def steps_per_epoch(n_samples: int, batch_size: int) -> int:
    return max(1, math.ceil(n_samples / batch_size))


def poisson_sample_rate(n_samples: int, batch_size: int) -> float:
    """q = 1 / steps_per_epoch, as Opacus does, so an epoch touches n patients on average."""
    return 1.0 / steps_per_epoch(n_samples, batch_size)


def class_weights(y: np.ndarray | torch.Tensor) -> tuple[float, float]:
    """(negative, positive) weights n / (2 n_class), so both classes weigh the same in total.

    A class with no rows gets weight 1 (there is nothing to balance). These weights are a
    statistic of the training labels: adding or removing one patient changes every other
    patient's weighted gradient, so DP-SGD's sensitivity would no longer be C. `loss_weights`
    never uses them under DP.
    """
    labels = torch.as_tensor(y).flatten()
    n = labels.numel()
    positives = int((labels > 0.5).sum())
    negatives = n - positives
    if positives == 0 or negatives == 0:
        return 1.0, 1.0
    return n / (2 * negatives), n / (2 * positives)


def loss_weights(
    settings: TrainingSettings, y_train: np.ndarray | torch.Tensor, *, private: bool
) -> tuple[float, float]:
    """The (negative, positive) loss weights training uses; under DP, never from the labels.

    Fixed `class_weights` are used as given (they are data-independent). "balanced" is refused
    under DP: its weights n / (2 n_class) make each patient's clipped gradient depend on the
    others' labels (docs/privacy.md, "What training computes from the data").
    """
    if settings.class_weights is not None:
        return float(settings.class_weights[0]), float(settings.class_weights[1])
    if settings.class_weighting == "none" or (settings.class_weighting == "auto" and private):
        return 1.0, 1.0
    if private:
        raise ValueError(
            "class_weighting 'balanced' computes loss weights from the training labels, so one "
            "patient would change every other patient's gradient and DP-SGD's sensitivity would "
            "exceed max_grad_norm; fix: use 'auto' or 'none', or fixed class_weights "
            "(e.g. from a published prevalence)"
        )
    return class_weights(y_train)


def make_loss(
    settings: TrainingSettings, y_train: np.ndarray | torch.Tensor, *, private: bool
) -> PerSampleLoss:
    """The per-sample loss the settings ask for: BCE or focal, weighted by `loss_weights`.

    `private` says whether the loss is for DP-SGD. Each sample's loss depends on its own logit
    and label only, so per-sample clipping bounds each patient's influence.
    """
    if is_survival_labels(y_train):
        return make_survival_loss(settings.survival_loss, private=private)
    weight_neg, weight_pos = loss_weights(settings, y_train, private=private)
    focal, gamma = settings.loss == "focal", settings.focal_gamma

    def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        if focal:
            # p_t = exp(-bce) is the probability given to the true class.
            loss = (1 - torch.exp(-loss)).pow(gamma) * loss
        if weight_neg != 1.0 or weight_pos != 1.0:
            loss = loss * torch.where(labels > 0.5, weight_pos, weight_neg)
        return loss

    return per_sample_loss


class LocalTrainer:
    """Trains `model` in place on one hospital's rows, a round at a time.

    Input rows must be one tensor (or array) whose first dimension is the patient; a model
    that takes a tuple (the multimodal net) should be fed its packed form (`pack_multimodal`).
    """

    def __init__(
        self,
        model: nn.Module,
        x_train: np.ndarray | torch.Tensor,
        y_train: np.ndarray | torch.Tensor,
        settings: TrainingSettings,
        ledger: PrivacyLedger | None = None,
        *,
        dp_engine: str = "auto",
    ) -> None:
        self.dp_engine = dp_engine  # per-sample gradients: "auto", "hooks" or "vmap"
        self.x, self.y = _as_training_tensors(x_train, y_train)
        self.model = model
        self.settings = settings
        self.loss_fn: PerSampleLoss  # built by the ledger setter: it depends on DP
        self.optimizer: Optimizer = _make_optimizer(model, settings)
        # Batches without DP only. DP's sampling and noise come from a fresh
        # privacy.private_generator() per step: a seed peers know (the config's) would let them
        # regenerate the noise, and a saved generator would replay it after a restart.
        self.sampling_rng = torch.Generator().manual_seed(settings.seed)
        self.rounds_trained = 0
        self._ledger: PrivacyLedger | None = None
        self._dp: DPSGDGradient | None = None
        self.ledger = ledger

    # ----------------------------------------------------------------- planning

    def sample_rate(self) -> float:
        return poisson_sample_rate(len(self.y), self.settings.batch_size)

    def expected_batch_size(self) -> float:
        return self.sample_rate() * len(self.y)

    def steps_per_round(self) -> int:
        if self.settings.local_steps:
            return self.settings.local_steps
        return self.settings.local_epochs * steps_per_epoch(len(self.y), self.settings.batch_size)

    @property
    def ledger(self) -> PrivacyLedger | None:
        return self._ledger

    @ledger.setter
    def ledger(self, ledger: PrivacyLedger | None) -> None:
        if ledger is not None and not math.isclose(
            ledger.sample_rate, self.sample_rate(), rel_tol=1e-9
        ):
            raise ValueError(
                f"the privacy ledger was planned for sample rate {ledger.sample_rate:.6g} but this "
                f"trainer samples at {self.sample_rate():.6g} ({len(self.y)} rows, batch_size "
                f"{self.settings.batch_size}); fix: plan the ledger with trainer.sample_rate()"
            )
        # "auto" class weighting depends on whether training is private: rebuild the loss.
        self.loss_fn = make_loss(self.settings, self.y, private=ledger is not None)
        self._ledger = ledger
        if self._dp is not None:
            self._dp.close()
        self._dp = None
        if ledger is not None:
            self._dp = DPSGDGradient(
                self.model,
                self.loss_fn,
                max_grad_norm=ledger.max_grad_norm,
                noise_multiplier=ledger.noise_multiplier,
                expected_batch_size=self.expected_batch_size(),
                engine=self.dp_engine,
            )

    # ----------------------------------------------------------------- training

    def train_round(
        self, reference_state: Mapping[str, np.ndarray | torch.Tensor] | None = None
    ) -> RoundStats:
        """Train `steps_per_round()` steps; with DP, report epsilon spent afterwards.

        `reference_state` is FedProx's anchor (the model this round started from, i.e. the last
        aggregate); None means "the model as it is now". Raises BudgetExhausted before touching
        the data if the ledger cannot afford a single step.
        """
        self.set_learning_rate(learning_rate_at(self.settings, self.rounds_trained))
        stats = self.train_steps(self.steps_per_round(), reference_state)
        self.rounds_trained += 1
        if self.ledger is None:
            return stats
        return replace(stats, epsilon_spent=self.ledger.epsilon_spent())

    def set_learning_rate(self, lr: float) -> None:
        """Used by the schedule before each round (Adam's and SGDStep's rate alike)."""
        if isinstance(self.optimizer, SGDStep):
            self.optimizer.lr = lr
        else:
            for group in self.optimizer.param_groups:
                group["lr"] = lr

    def train_steps(
        self, steps: int, reference_state: Mapping[str, np.ndarray | torch.Tensor] | None = None
    ) -> RoundStats:
        """Train up to `steps` steps (fewer if the privacy budget runs out first).

        Leaves `epsilon_spent` None: asking the accountant costs more than a small model's
        epoch, so `train_round` asks once per round.
        """
        ledger = self.ledger
        if ledger is not None and ledger.remaining_steps() == 0:
            raise BudgetExhausted(
                f"privacy budget spent: epsilon {ledger.epsilon_spent():.4f} of "
                f"{ledger.epsilon_budget} after {ledger.steps_taken} steps; no step is left"
            )
        anchor = self._fedprox_anchor(reference_state)
        self.model.train()
        taken = samples = 0
        loss_total = torch.zeros(())
        exhausted = False
        for _ in range(steps):
            if ledger is not None:
                try:
                    ledger.charge(1)  # before the step: never take one the budget cannot pay
                except BudgetExhausted:
                    exhausted = True
                    break
            # Under DP a new OS-seeded generator per step (looked up now, so tests may replace
            # it): no step's batch can be replayed or rebuilt from anything saved.
            rng = privacy.private_generator() if self._dp is not None else self.sampling_rng
            batch = self._poisson_batch(rng)
            x, y = augment_batch(self.x[batch], self.settings.augment, rng), self.y[batch]
            self.optimizer.zero_grad(set_to_none=True)
            if self._dp is not None:
                losses = self._dp.compute(x, y)
            else:
                losses = self.loss_fn(self.model(x).reshape(-1), y)
                if len(batch) > 0:
                    (losses.sum() / self.expected_batch_size()).backward()
                losses = losses.detach()
            if anchor is not None:
                self._add_proximal_gradient(anchor)
            self.optimizer.step()
            taken += 1
            samples += len(batch)
            loss_total += losses.sum()
        mean_loss = float(loss_total) / samples if samples else float("nan")
        return RoundStats(taken, samples, mean_loss, None, exhausted)

    def _poisson_batch(self, rng: torch.Generator) -> torch.Tensor:
        """Indices of the patients in this step: each is included with probability q."""
        included = torch.rand(len(self.y), generator=rng) < self.sample_rate()
        return included.nonzero().squeeze(1)

    def _fedprox_anchor(
        self, reference_state: Mapping[str, np.ndarray | torch.Tensor] | None
    ) -> dict[str, torch.Tensor] | None:
        if self.settings.fedprox_mu == 0:
            return None
        anchor: dict[str, torch.Tensor] = {}
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            if reference_state is None:
                anchor[name] = param.detach().clone()
            elif name not in reference_state:
                raise ValueError(f"FedProx reference state lacks parameter {name!r}")
            else:
                value = torch.as_tensor(np.asarray(reference_state[name]), dtype=param.dtype)
                if value.shape != param.shape:
                    raise ValueError(
                        f"FedProx reference {name!r} has shape {tuple(value.shape)}, the model "
                        f"needs {tuple(param.shape)}"
                    )
                anchor[name] = value
        return anchor

    def _add_proximal_gradient(self, anchor: dict[str, torch.Tensor]) -> None:
        """Add mu (w - w_ref): the gradient of FedProx's (mu / 2) ||w - w_ref||^2.

        It uses no patient data (w is the DP model, w_ref the last aggregate), so adding it
        after the noise keeps every step DP."""
        mu = self.settings.fedprox_mu
        for name, param in self.model.named_parameters():
            if name not in anchor:
                continue
            pull = (param.detach() - anchor[name]).mul_(mu)
            param.grad = pull if param.grad is None else param.grad.add_(pull)

    # ----------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state and the non-DP sampler's state (the model and ledger are saved by
        their owners). No DP randomness is saved: there is none to save (`private_generator`)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "sampling_rng": self.sampling_rng.get_state(),
            "rounds_trained": self.rounds_trained,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`. A checkpoint written before DP draws moved to
        `private_generator` also holds "private_rng", the old DP generator's state: it is
        ignored on purpose, because restoring it would replay that generator's noise."""
        missing = {"optimizer", "sampling_rng", "rounds_trained"} - set(state)
        if missing:
            raise ValueError(f"trainer state lacks {sorted(missing)}; the checkpoint is damaged")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.sampling_rng.set_state(state["sampling_rng"])
        except (ValueError, RuntimeError, KeyError, TypeError) as err:
            raise ValueError(f"trainer state does not fit this model/optimizer: {err}") from err
        self.rounds_trained = int(state["rounds_trained"])

    def state_dict_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        return buffer.getvalue()

    def load_state_dict_bytes(self, data: bytes) -> None:
        """Restore from `state_dict_bytes()`; only tensors and plain data are unpickled."""
        try:
            state = torch.load(io.BytesIO(data), weights_only=True)
        except Exception as err:  # torch raises many types for bad bytes
            raise ValueError(f"trainer state bytes are not a saved trainer state: {err}") from err
        if not isinstance(state, dict):
            raise ValueError("trainer state bytes do not hold a dict")
        self.load_state_dict(state)


def predict_proba(
    model: nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 4096
) -> np.ndarray:
    """P(label = 1) for each row, in eval mode and without gradients; restores the mode."""
    rows = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    rows = rows.to(torch.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            chunks = [
                torch.sigmoid(model(rows[i : i + batch_size]).reshape(-1))
                for i in range(0, len(rows), batch_size)
            ]
    finally:
        model.train(was_training)
    if not chunks:
        return np.zeros(0, dtype=np.float64)
    return torch.cat(chunks).numpy().astype(np.float64)


def evaluate(
    model: nn.Module,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    fixed_threshold: float | None,
) -> dict[str, Any]:
    """Clinical metrics on the held-out rows, at a threshold that never looks at them.

    With `fixed_threshold` None (no DP) the threshold is Youden's J on the training rows and
    the majority baseline is the training labels' majority. With a fixed threshold (DP's
    default, 0.5) nothing returned is computed from training rows: Youden's threshold would be
    one training patient's score, so the majority baseline is the test split's own
    (docs/privacy.md). Every node and every baseline evaluates through this one function.
    """
    from murmur.models.metrics import clinical_metrics  # metrics imports no torch; kept local

    if is_survival_labels(y_test):  # survival: Harrell's C of the risk score, no threshold
        return survival_metrics(y_test, predict_risk(model, x_test))
    threshold = fixed_threshold
    if threshold is None:
        threshold = choose_threshold(y_train, predict_proba(model, x_train))
    metrics = clinical_metrics(
        y_test,
        predict_proba(model, x_test),
        threshold,
        y_train=None if fixed_threshold is not None else y_train,
    )
    metrics["threshold"] = float(threshold)
    return metrics


def choose_threshold(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """The decision threshold (predict positive when p >= t), chosen on training data.

    Rule: Youden's J. Among the ROC cut points, take the one maximising
    sensitivity + specificity - 1 (ties: the highest threshold). With only one class present
    there is no ROC curve, so the threshold is 0.5. The threshold is computed from raw
    training rows: it is for local evaluation and is not differentially private.
    """
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    if len(y) != len(p):
        raise ValueError(f"{len(y)} labels but {len(p)} probabilities")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("probabilities must be finite and within [0, 1]")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    if len(np.unique(y)) < 2:
        return 0.5
    # The ROC cut points are the distinct scores, highest first; at cut point t the true and
    # false positives are the patients scoring >= t. (scikit-learn's roc_curve gives the same
    # points, tested, but importing scikit-learn costs every node 0.9 s and 72 MB.)
    order = np.argsort(-p, kind="mergesort")
    p_sorted, y_sorted = p[order], y[order]
    last_of_each_score = np.r_[np.flatnonzero(np.diff(p_sorted)), len(p_sorted) - 1]
    true_positives = np.cumsum(y_sorted)[last_of_each_score]
    false_positives = last_of_each_score + 1 - true_positives
    youden = true_positives / y.sum() - false_positives / (len(y) - y.sum())
    best = int(np.argmax(youden))  # the first maximum: the highest threshold among ties
    return float(np.clip(p_sorted[last_of_each_score[best]], 0.0, 1.0))


def _as_training_tensors(
    x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    xs = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    ys = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    survival = is_survival_labels(ys)
    xs, ys = xs.detach().to(torch.float32), ys.detach().to(torch.float32)
    ys = ys if survival else ys.reshape(-1)
    if len(xs) == 0:
        raise ValueError("no training rows: a hospital needs at least one patient to train")
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} training rows but {len(ys)} labels")
    if not torch.isfinite(xs).all():
        raise ValueError("training features contain NaN or infinite values; impute them first")
    if survival:
        check_survival_labels(ys, "training labels")
    elif not ((ys == 0) | (ys == 1)).all():
        raise ValueError("training labels must be 0 or 1")
    return xs, ys


def _make_optimizer(model: nn.Module, settings: TrainingSettings) -> Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.learning_rate)
    return SGDStep(params, lr=settings.learning_rate, momentum=settings.momentum)
