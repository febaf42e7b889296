"""The optimizer a hospital's trainer steps: torch's own SGD update behind a small object whose
state (the momentum buffers) saves and restores with the model, and the protocol the trainer
needs of any optimizer (torch.optim.Adam has it too). models/training.py builds one per trainer.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn
from torch.optim.sgd import sgd as sgd_update


class Optimizer(Protocol):
    """What the trainer needs of an optimizer (torch.optim.Adam and `SGDStep` both have it)."""

    def zero_grad(self, set_to_none: bool = True) -> None: ...
    def step(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class SGDStep:
    """SGD with momentum, as torch.optim.SGD: its update runs torch's functional form
    (``torch.optim.sgd.sgd``, the code ``SGD.step`` calls), with the momentum buffers kept here.

    Why not ``torch.optim.SGD`` itself: constructing any ``torch.optim`` optimizer imports
    ``torch._dynamo`` (its ``add_param_group`` is wrapped to disable the compiler), which costs
    every node process about 1.2 s of CPU and 72 MB resident (measured, docs/performance.md)
    for a compiler the node never uses. tests/test_training.py checks that both give the same
    parameters step for step.
    """

    def __init__(self, params: list[nn.Parameter], lr: float, momentum: float) -> None:
        self.params = list(params)
        self.lr = lr
        self.momentum = momentum
        self.momentum_buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            if set_to_none or param.grad is None:
                param.grad = None
            else:
                param.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        active = [i for i, param in enumerate(self.params) if param.grad is not None]
        buffers = [self.momentum_buffers[i] for i in active]
        sgd_update(
            [self.params[i] for i in active],
            [self.params[i].grad for i in active],
            buffers,  # filled in place where a buffer is still None
            foreach=False,
            weight_decay=0.0,
            momentum=self.momentum,
            lr=self.lr,
            dampening=0.0,
            nesterov=False,
            maximize=False,
        )
        if self.momentum:
            for i, buffer in zip(active, buffers, strict=True):
                self.momentum_buffers[i] = buffer

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.SGD's layout, so checkpoints written by either load in both."""
        return {
            "state": {
                i: {"momentum_buffer": buffer}
                for i, buffer in enumerate(self.momentum_buffers)
                if buffer is not None
            },
            "param_groups": [
                {
                    "lr": self.lr,
                    "momentum": self.momentum,
                    "dampening": 0.0,
                    "weight_decay": 0.0,
                    "nesterov": False,
                    "maximize": False,
                    "params": list(range(len(self.params))),
                }
            ],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            raise ValueError(
                f"optimizer state is for {sum(len(g['params']) for g in groups)} parameters "
                f"in {len(groups)} groups; this model has {len(self.params)} in one"
            )
        buffers: list[torch.Tensor | None] = [None] * len(self.params)
        for index, entry in state_dict["state"].items():
            i = int(index)
            buffer = entry["momentum_buffer"]
            if not 0 <= i < len(self.params) or buffer.shape != self.params[i].shape:
                raise ValueError(f"momentum buffer {i} does not fit the model's parameters")
            buffers[i] = buffer.detach().clone()
        self.momentum_buffers = buffers
