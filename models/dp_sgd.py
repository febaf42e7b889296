"""The DP-SGD gradient: one Poisson-sampled batch in, one private gradient out.

`DPSGDGradient` computes per-patient gradients, clips each to L2 norm C, sums them, adds
Gaussian noise N(0, (sigma C)^2 I) and divides by the expected batch size (what Opacus does).
Everything the node later shares is computed from these gradients only, so it is
post-processing of the DP-SGD output. The noise comes from `privacy.private_generator`; what
the steps cost is the accountant's and the ledger's business (models/privacy.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from murmur.models import privacy
from torch import nn

log = logging.getLogger(__name__)


PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(logits (B,), labels (B,), or (B, 2) for survival) -> one loss per sample (B,). Sample i's
loss may depend on sample i only (no batch statistics), or per-sample clipping would not bound
its influence."""


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """min(1, C / ||g_i||) per sample: scaling g_i by it gives a norm of at most C."""
    return (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)


class DPSGDGradient:
    """Computes the DP-SGD gradient of one batch and writes it into each parameter's `.grad`.

    gradient = (sum_i clip_C(g_i) + N(0, sigma^2 C^2 I)) / (q n), where g_i is patient i's
    gradient and q n the expected batch size (public, unlike the sampled batch's size).

    The noise of every call comes from a fresh `private_generator()`, never from a generator
    held here, so nothing this object keeps can replay it.

    Per-sample gradients come from one of two engines that compute the same thing
    (`engine="auto"` picks hooks when the model allows them):
    - layer hooks (fast path) when every trainable parameter belongs to an nn.Linear or
      nn.Conv2d: one ordinary forward and backward, then each layer's per-sample gradient is
      built from its input and its output gradient (as Opacus's grad samplers do);
    - torch.func (vmap over grad of a functional call), which works for any model but runs
      several times slower on small models.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: PerSampleLoss,
        *,
        max_grad_norm: float,
        noise_multiplier: float,
        expected_batch_size: float,
        engine: str = "auto",
    ) -> None:
        if engine not in ("auto", "hooks", "vmap"):
            raise ValueError(f"unknown engine {engine!r}: use 'auto', 'hooks' or 'vmap'")
        if expected_batch_size <= 0:
            raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
        if max_grad_norm <= 0 or noise_multiplier < 0:
            raise ValueError("max_grad_norm must be > 0 and noise_multiplier >= 0")
        self.model = model
        self.loss_fn = loss_fn
        self.max_grad_norm = float(max_grad_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = float(expected_batch_size)
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named_params:
            raise ValueError("the model has no trainable parameters")
        self._hooks: _LayerHooks | None = None
        if engine != "vmap":
            self._hooks = _LayerHooks.try_attach(model, self.named_params)
        if engine == "hooks" and self._hooks is None:
            raise ValueError(
                "engine='hooks' needs every trainable parameter to be the weight or bias of one "
                "nn.Linear or zero-padded nn.Conv2d; fix: use engine='auto' (falls back to vmap)"
            )
        self._vmapped: Callable[..., Any] | None = None

    def close(self) -> None:
        """Remove the forward hooks from the model (a discarded instance must not leave them)."""
        if self._hooks is not None:
            self._hooks.detach()
            self._hooks = None

    @property
    def engine(self) -> str:
        """Which per-sample gradient engine this model gets: "hooks" or "vmap"."""
        return "hooks" if self._hooks is not None else "vmap"

    def per_sample_gradients(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """([per-sample gradient (B, *p.shape) for each trainable p], per-sample losses (B,))."""
        parts, losses = self._parts(x, y)
        return [part.materialize() for part in parts], losses

    def compute(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Set `.grad` of every trainable parameter to the batch's DP-SGD gradient.

        Returns the per-sample losses (detached) for local diagnostics. An empty batch (Poisson
        sampling can draw one) still yields a noise-only gradient, as the accountant assumes.
        """
        noise_scale = self.noise_multiplier * self.max_grad_norm / self.expected_batch_size
        generator = privacy.private_generator()  # looked up now: tests may replace it
        if len(x) == 0:
            for _, param in self.named_params:
                noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
                param.grad = noise.mul_(noise_scale)
            return torch.zeros(0)
        parts, losses = self._parts(x, y)
        squared_norms = torch.stack([part.squared_norms() for part in parts]).sum(0)
        # Dividing the clip factors by q n averages the clipped sum in the same matmul.
        weights = clip_factors(squared_norms.sqrt(), self.max_grad_norm) / self.expected_batch_size
        for (_, param), part in zip(self.named_params, parts, strict=True):
            gradient = part.weighted_sum(weights)
            noise = torch.randn(gradient.shape, generator=generator, dtype=gradient.dtype)
            param.grad = gradient.add_(noise, alpha=noise_scale)
        return losses

    def _parts(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[_PerSample], torch.Tensor]:
        if self._hooks is not None:
            result = self._hooks.capture(self.model, self.loss_fn, x, y)
            if result is not None:
                return result
            log.warning("a layer is reused or changed in place; using torch.func from now on")
            self._hooks.detach()
            self._hooks = None
        return self._vmap_parts(x, y)

    def _vmap_parts(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[list[_PerSample], torch.Tensor]:
        from torch.func import functional_call, grad, vmap

        if self._vmapped is None:
            model, loss_fn = self.model, self.loss_fn

            def one_sample(params: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor):
                logits = functional_call(model, params, (xi.unsqueeze(0),)).reshape(1)
                loss = loss_fn(logits, yi.unsqueeze(0)).sum()  # yi: a label, or (time, event)
                return loss, loss.detach()

            self._vmapped = vmap(
                grad(one_sample, has_aux=True), in_dims=(None, 0, 0), randomness="different"
            )
        params = {name: p.detach() for name, p in self.named_params}
        grads, losses = self._vmapped(params, x, y)
        return [_Materialized(grads[name]) for name, _ in self.named_params], losses


class _Materialized:
    """Per-sample gradients held in full, (B, *shape)."""

    def __init__(self, grads: torch.Tensor) -> None:
        self.grads = grads

    def squared_norms(self) -> torch.Tensor:
        flat = self.grads.flatten(1)
        return (flat * flat).sum(1)

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        """sum_i weights_i g_i, as one matrix-vector product."""
        return (weights @ self.grads.flatten(1)).view(self.grads.shape[1:])

    def materialize(self) -> torch.Tensor:
        return self.grads


class _OuterProduct:
    """Per-sample gradients of a Linear weight on (B, in) inputs, kept as g_i = b_i a_i^T.

    Never materialised in training: ||g_i||^2 = ||b_i||^2 ||a_i||^2, and the weighted sum
    sum_i w_i b_i a_i^T is one matrix product (Goodfellow 2015's trick, "ghost" norms)."""

    def __init__(self, backprop: torch.Tensor, inputs: torch.Tensor) -> None:
        self.b, self.a = backprop, inputs

    def squared_norms(self) -> torch.Tensor:
        return (self.b * self.b).sum(1) * (self.a * self.a).sum(1)

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        return (self.b * weights.unsqueeze(1)).t() @ self.a

    def materialize(self) -> torch.Tensor:
        return torch.einsum("bo,bi->boi", self.b, self.a)


_PerSample = _Materialized | _OuterProduct


class _LayerHooks:
    """Per-sample gradients of nn.Linear and nn.Conv2d layers from forward hooks.

    Sample i's gradient of a Linear weight is sum_t b_it a_it^T (a: the layer's input,
    b: the gradient of the summed loss with respect to the layer's output; t runs over any
    extra dimensions); a Conv2d is the same after unfolding its input into patches. Because
    sample i's loss depends on sample i only, b_i is sample i's own output gradient.
    """

    def __init__(self, layers: list[nn.Module], order: list[tuple[int, str]]) -> None:
        self.layers = layers
        self.order = order  # for each trainable parameter: (layer index, "weight" | "bias")
        self.recording = False
        self.records: list[tuple[torch.Tensor, torch.Tensor, int] | None] = [None] * len(layers)
        self.reused = False
        self.handles = [
            layer.register_forward_hook(self._make_hook(i)) for i, layer in enumerate(layers)
        ]

    @classmethod
    def try_attach(
        cls, model: nn.Module, named_params: list[tuple[str, nn.Parameter]]
    ) -> _LayerHooks | None:
        """Hooks if every trainable parameter is one supported layer's weight or bias, else None."""
        owner: dict[int, tuple[nn.Module, str]] = {}
        shared: set[int] = set()
        for module in model.modules():
            # Exact types: a subclass may compute differently from what the formulas assume.
            supported = type(module) is nn.Linear or (
                type(module) is nn.Conv2d
                and module.padding_mode == "zeros"
                and not isinstance(module.padding, str)
            )
            for name, param in module.named_parameters(recurse=False):
                if supported and name in ("weight", "bias"):
                    if id(param) in owner:
                        shared.add(id(param))  # tied weights: per-layer sums would miss a use
                    owner[id(param)] = (module, name)
        if any(id(p) not in owner or id(p) in shared for _, p in named_params):
            return None
        layers: list[nn.Module] = []
        order: list[tuple[int, str]] = []
        for _, param in named_params:
            module, name = owner[id(param)]
            if module not in layers:
                layers.append(module)
            order.append((layers.index(module), name))
        return cls(layers, order)

    def _make_hook(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self.recording:
                if self.records[index] is not None:
                    self.reused = True
                self.records[index] = (inputs[0].detach(), output, output._version)

        return hook

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()

    def capture(
        self, model: nn.Module, loss_fn: PerSampleLoss, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[list[_PerSample], torch.Tensor] | None:
        """One forward and backward; None if this model defeats the hooks (then use vmap)."""
        self.records = [None] * len(self.layers)
        self.reused = False
        self.recording = True
        try:
            logits = model(x).reshape(-1)
        finally:
            self.recording = False
        records = self.records
        if self.reused or any(r is None or r[1]._version != r[2] for r in records):
            # A layer ran twice, was skipped (its weights may have been used some other way,
            # e.g. through F.linear), or its output was changed in place: hooks would be wrong.
            return None
        losses = loss_fn(logits, y)
        outputs = [r[1] for r in records]  # type: ignore[index]
        backprops = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
        parts: list[_PerSample] = []
        for index, kind in self.order:
            layer, (inputs, _, _), backprop = self.layers[index], records[index], backprops[index]
            if backprop is None:  # the output did not reach the loss: a zero gradient
                param = getattr(layer, kind)
                parts.append(_Materialized(param.new_zeros((len(x), *param.shape))))
            elif isinstance(layer, nn.Linear):
                parts.append(_linear_part(kind, inputs, backprop))
            else:
                parts.append(_conv2d_part(kind, layer, inputs, backprop))
        return parts, losses.detach()


def _linear_part(kind: str, inputs: torch.Tensor, backprop: torch.Tensor) -> _PerSample:
    batch = backprop.shape[0]
    if backprop.ndim == 2:
        return _Materialized(backprop) if kind == "bias" else _OuterProduct(backprop, inputs)
    b = backprop.reshape(batch, -1, backprop.shape[-1])  # (B, T, out)
    if kind == "bias":
        return _Materialized(b.sum(1))
    a = inputs.reshape(batch, -1, inputs.shape[-1])  # (B, T, in)
    return _Materialized(torch.einsum("bto,bti->boi", b, a))


def _conv2d_part(
    kind: str, layer: nn.Conv2d, inputs: torch.Tensor, backprop: torch.Tensor
) -> _PerSample:
    batch, groups = backprop.shape[0], layer.groups
    b = backprop.reshape(batch, groups, layer.out_channels // groups, -1)  # (B, G, out/G, L)
    if kind == "bias":
        return _Materialized(b.sum(3).reshape(batch, -1))
    patches = F.unfold(
        inputs,
        layer.kernel_size,
        dilation=layer.dilation,
        padding=layer.padding,
        stride=layer.stride,
    )  # (B, in/G * kh * kw * G, L)
    a = patches.reshape(batch, groups, -1, patches.shape[-1])
    grads = torch.einsum("bgol,bgkl->bgok", b, a)
    return _Materialized(grads.reshape(batch, *layer.weight.shape))
