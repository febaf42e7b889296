"""Server-style adaptive optimizers, run by each node on its own (FedAdam, FedYogi, FedAdagrad).

Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2, has a server treat
the mean of the clients' updates as a pseudo-gradient and step with Adam, Yogi or Adagrad.
Gossip has no server, so each node plays that role for itself: its pseudo-gradient is

    delta_t = robust_aggregate_t - previous_model_t

(the previous model is the one this node started round t from), and its next model is

    m_t = beta1 m_{t-1} + (1 - beta1) delta_t
    v_t = v_{t-1} + delta_t^2                                          (adagrad)
        = v_{t-1} - (1 - beta2) delta_t^2 sign(v_{t-1} - delta_t^2)    (yogi)
        = beta2 v_{t-1} + (1 - beta2) delta_t^2                        (adam)
    x_{t+1} = x_t + lr m_t / (sqrt(v_t) + tau)

with m_0 = 0 and v_0 = tau^2, as in the paper (no bias correction). The states m and v never
leave the node. Everything here is computed from the node's previous model and the robust
aggregate, both of which are functions of DP-SGD outputs only, so under DP it is
post-processing and costs no privacy (docs/privacy.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

SERVER_OPTIMIZERS: tuple[str, ...] = ("none", "adam", "yogi", "adagrad")


@dataclass(frozen=True)
class ServerOptimizerSettings:
    """Defaults follow Reddi et al.'s recommendations (beta1 0.9, beta2 0.99, tau 1e-3)."""

    name: str = "none"
    learning_rate: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.name not in SERVER_OPTIMIZERS:
            raise ValueError(
                f"unknown server optimizer {self.name!r}: use one of {SERVER_OPTIMIZERS}"
            )
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"server learning_rate must be > 0, got {self.learning_rate}")
        for field_name in ("beta1", "beta2"):
            value = getattr(self, field_name)
            if not 0 <= value < 1:
                raise ValueError(f"server {field_name} must be in [0, 1), got {value}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"server tau must be > 0, got {self.tau}")


class ServerOptimizer:
    """One node's adaptive outer optimizer over flat float32 model vectors."""

    def __init__(self, settings: ServerOptimizerSettings) -> None:
        if settings.name == "none":
            raise ValueError("ServerOptimizer needs an optimizer; 'none' means do not build one")
        self.settings = settings
        self.first_moment: np.ndarray | None = None  # m
        self.second_moment: np.ndarray | None = None  # v
        self.steps = 0

    def step(self, previous: np.ndarray, aggregate: np.ndarray) -> np.ndarray:
        """The next model from the previous one and this round's robust aggregate."""
        s = self.settings
        x = np.asarray(previous, dtype=np.float64)
        delta = np.asarray(aggregate, dtype=np.float64) - x
        if x.shape != delta.shape or x.ndim != 1:
            raise ValueError(f"flat vectors expected, got {x.shape} and {delta.shape}")
        if self.first_moment is None or self.second_moment is None:
            self.first_moment = np.zeros_like(x)
            self.second_moment = np.full_like(x, s.tau**2)
        elif self.first_moment.shape != x.shape:
            raise ValueError(
                f"server optimizer state has {self.first_moment.size} entries, model {x.size}"
            )
        m, v, squared = self.first_moment, self.second_moment, delta * delta
        m = s.beta1 * m + (1 - s.beta1) * delta
        if s.name == "adagrad":
            v = v + squared
        elif s.name == "yogi":
            v = v - (1 - s.beta2) * squared * np.sign(v - squared)
        else:
            v = s.beta2 * v + (1 - s.beta2) * squared
        self.first_moment, self.second_moment = m, v
        self.steps += 1
        result = x + s.learning_rate * m / (np.sqrt(v) + s.tau)
        return result.astype(np.asarray(previous).dtype, copy=False)

    # ------------------------------------------------------------ checkpoints

    def to_state(self) -> dict[str, Any]:
        """Plain data for the node's checkpoint (msgpack): the moments as float64 bytes."""
        return {
            "name": self.settings.name,
            "steps": self.steps,
            "m": None if self.first_moment is None else self.first_moment.tobytes(),
            "v": None if self.second_moment is None else self.second_moment.tobytes(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.settings.name:
            raise ValueError(
                f"checkpoint holds server optimizer {state.get('name')!r}, config says "
                f"{self.settings.name!r}"
            )
        m, v = state.get("m"), state.get("v")
        if (m is None) != (v is None) or (m is not None and len(m) != len(v)):
            raise ValueError("server optimizer state is damaged: moments missing or mismatched")
        self.first_moment = None if m is None else np.frombuffer(m, dtype=np.float64).copy()
        self.second_moment = None if v is None else np.frombuffer(v, dtype=np.float64).copy()
        self.steps = int(state.get("steps", 0))
