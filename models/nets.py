"""The models a hospital can train: each returns one logit per sample, shape (B,).

Every layer here works with per-sample gradients through ``torch.func.vmap(grad(...))``,
which DP-SGD needs: there is no BatchNorm (it mixes samples in a batch) and no in-place
trickery. Building a model with the same ``seed`` gives bit-identical weights, and does not
disturb the caller's global torch random state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

MODEL_NAMES: tuple[str, ...] = (
    "logreg",
    "mlp",
    "cnn",
    "cnn_gn",
    "multimodal",
    "cox",
    "resnet18",
    "resnet18_25m",
)


class LogisticRegression(nn.Module):
    """One linear layer: the FLamby Fed-Heart-Disease baseline (``nn.Linear(13, 1)``)."""

    def __init__(self, input_shape: Sequence[int]) -> None:
        super().__init__()
        self.linear = nn.Linear(math.prod(input_shape), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1)).squeeze(-1)


class CoxRegression(LogisticRegression):
    """A linear Cox model (FLamby Fed-TCGA-BRCA's ``nn.Linear(39, 1)``): the output is the
    log relative hazard. The bias cancels out of the partial likelihood (its gradient there
    is 0); under DP's exponential likelihood it is the log baseline hazard (models/survival.py).

    It starts from the null model, beta = 0 (as Newton fits of the Cox model do): a random
    start is a random risk score, which a few noisy DP steps would not wash out."""

    def __init__(self, input_shape: Sequence[int]) -> None:
        super().__init__(input_shape)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)


class MLP(nn.Module):
    """A ReLU multilayer perceptron for tabular features (13 -> 64 -> 32 -> 1 by default)."""

    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int] = (64, 32)) -> None:
        super().__init__()
        if not hidden or any(int(h) < 1 for h in hidden):
            raise ValueError(f"mlp hidden sizes must be a non-empty list of ints >= 1: {hidden}")
        layers: list[nn.Module] = []
        width = math.prod(input_shape)
        for size in hidden:
            layers += [nn.Linear(width, int(size)), nn.ReLU()]
            width = int(size)
        layers.append(nn.Linear(width, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1)).squeeze(-1)


def _conv_encoder(channels: int) -> nn.Sequential:
    """Two 3x3 conv + ReLU + 2x2 max-pool stages: (C, H, W) -> (16, H/4, W/4)."""
    return nn.Sequential(
        nn.Conv2d(channels, 8, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )


def _check_image_shape(model: str, input_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(input_shape) != 3 or min(input_shape) < 1 or min(input_shape[1:]) < 4:
        raise ValueError(
            f"{model} needs an image input_shape (channels, height, width) with height and "
            f"width >= 4, e.g. (1, 28, 28); got {tuple(input_shape)}"
        )
    channels, height, width = (int(d) for d in input_shape)
    return channels, height, width


class SmallCNN(nn.Module):
    """A ~20k-parameter CNN for 1x28x28 images: two conv stages and a 24-unit head."""

    def __init__(self, input_shape: Sequence[int], hidden: int = 24) -> None:
        super().__init__()
        channels, height, width = _check_image_shape("cnn", input_shape)
        self.encoder = _conv_encoder(channels)
        self.head = nn.Sequential(
            nn.Linear(16 * (height // 4) * (width // 4), hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)).squeeze(-1)


class GroupNormCNN(nn.Module):
    """The default image model: three 3x3 conv stages with GroupNorm, global average pooling.

    GroupNorm normalises each sample on its own (BatchNorm mixes the samples of a batch, which
    per-sample clipping cannot allow), and without affine parameters, so every trainable
    parameter belongs to an nn.Conv2d or nn.Linear and DP-SGD's fast per-sample gradient hooks
    apply. 1x28x28 -> 16x14x14 -> 32x7x7 -> 64x7x7 -> 64 -> 1: about 23k parameters, chosen by
    measurement (docs/models.md).
    """

    def __init__(self, input_shape: Sequence[int], width: int = 16, groups: int = 4) -> None:
        super().__init__()
        channels, _, _ = _check_image_shape("cnn_gn", input_shape)
        if width < groups or width % groups:
            raise ValueError(f"cnn_gn width {width} must be a multiple of groups {groups}")
        widths = (width, 2 * width, 4 * width)
        layers: list[nn.Module] = []
        previous = channels
        for stage, out in enumerate(widths):
            layers += [
                nn.Conv2d(previous, out, kernel_size=3, padding=1),
                nn.GroupNorm(groups, out, affine=False),
                nn.ReLU(),
            ]
            if stage < 2:
                layers.append(nn.MaxPool2d(2))
            previous = out
        self.encoder = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(previous, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)).squeeze(-1)


class _BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with an identity (or 1x1 projection) shortcut, each
    convolution followed by affine-free GroupNorm, as in `GroupNormCNN`, so that DP-SGD's
    per-sample gradients see only nn.Conv2d parameters."""

    def __init__(self, inputs: int, outputs: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, outputs, affine=False)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, outputs, affine=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False),
                nn.GroupNorm(groups, outputs, affine=False),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (four stages of two basic blocks, 64-128-256-512 channels at ``width`` 64:
    11.2M parameters) with GroupNorm instead of BatchNorm, for DP-SGD.

    The stem is one 3x3 convolution of stride 2 without max-pooling, the usual adaptation to
    small images: a 1x28x28 MedMNIST image becomes 14x14 in stage one and 2x2 in stage four,
    which keeps a training step within a CPU's reach. ``width`` 96 is the 25M-parameter
    configuration (``resnet18_25m``: 25.2M), the size the wire and memory benchmarks use.
    """

    def __init__(self, input_shape: Sequence[int], width: int = 64, groups: int = 8) -> None:
        super().__init__()
        channels, _, _ = _check_image_shape("resnet18", input_shape)
        if width < groups or width % groups:
            raise ValueError(f"resnet18 width {width} must be a multiple of groups {groups}")
        self.stem = nn.Sequential(
            nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False),
            nn.GroupNorm(groups, width, affine=False),
            nn.ReLU(),
        )
        blocks: list[nn.Module] = []
        previous = width
        for stage in range(4):
            out = width * 2**stage
            for index in range(2):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(_BasicBlock(previous, out, stride, groups))
                previous = out
        self.stages = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(previous, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x))).squeeze(-1)


def _resnet18_25m(input_shape: Sequence[int], groups: int = 8) -> ResNet18:
    return ResNet18(input_shape, width=96, groups=groups)


class MultimodalNet(nn.Module):
    """Image encoder + clinical-feature encoder + fusion head (late fusion by concatenation).

    Input, for a batch of B patients, either
    - a pair ``(images, clinical)`` / a dict ``{"image": ..., "clinical": ...}`` with images
      (B, C, H, W) and clinical features (B, k); or
    - one packed float tensor (B, C*H*W + k): each row is the flattened image followed by the
      clinical features (`pack_multimodal`). Training and DP code that only handles plain
      tensors can use this form unchanged.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        clinical_features: int,
        image_embedding: int = 32,
        clinical_embedding: int = 16,
        fusion_hidden: int = 16,
    ) -> None:
        super().__init__()
        channels, height, width = _check_image_shape("multimodal", input_shape)
        if clinical_features < 1:
            raise ValueError(f"multimodal needs clinical_features >= 1, got {clinical_features}")
        self.image_shape = (channels, height, width)
        self.clinical_features = int(clinical_features)
        self.image_encoder = nn.Sequential(
            _conv_encoder(channels),
            nn.Linear(16 * (height // 4) * (width // 4), image_embedding),
            nn.ReLU(),
        )
        self.clinical_encoder = nn.Sequential(
            nn.Linear(self.clinical_features, clinical_embedding), nn.ReLU()
        )
        self.fusion_head = nn.Sequential(
            nn.Linear(image_embedding + clinical_embedding, fusion_hidden),
            nn.ReLU(),
            nn.Linear(fusion_hidden, 1),
        )

    def forward(
        self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | dict[str, torch.Tensor]
    ) -> torch.Tensor:
        images, clinical = self._unpack(x)
        fused = torch.cat([self.image_encoder(images), self.clinical_encoder(clinical)], dim=1)
        return self.fusion_head(fused).squeeze(-1)

    def _unpack(self, x: object) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(x, dict):
            return x["image"], x["clinical"]
        if isinstance(x, tuple | list):
            images, clinical = x
            return images, clinical
        pixels = math.prod(self.image_shape)
        if (
            not isinstance(x, torch.Tensor)
            or x.ndim != 2
            or x.shape[1] != pixels + self.clinical_features
        ):
            raise ValueError(
                f"multimodal input must be (images, clinical) or a packed (B, "
                f"{pixels + self.clinical_features}) tensor; got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        images = x[:, :pixels].reshape(-1, *self.image_shape)
        return images, x[:, pixels:]


def pack_multimodal(images: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
    """Rows of [flattened image, clinical features]: the packed input `MultimodalNet` accepts."""
    if len(images) != len(clinical):
        raise ValueError(f"{len(images)} images but {len(clinical)} clinical rows")
    return torch.cat([images.flatten(1), clinical.flatten(1)], dim=1)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "logreg": LogisticRegression,
    "mlp": MLP,
    "cnn": SmallCNN,
    "cnn_gn": GroupNormCNN,
    "multimodal": MultimodalNet,
    "cox": CoxRegression,
    "resnet18": ResNet18,
    "resnet18_25m": _resnet18_25m,
}
_PARAMETERS: dict[str, tuple[str, ...]] = {
    "logreg": (),
    "cox": (),
    "mlp": ("hidden",),
    "cnn": ("hidden",),
    "cnn_gn": ("width", "groups"),
    "multimodal": ("clinical_features", "image_embedding", "clinical_embedding", "fusion_hidden"),
    "resnet18": ("width", "groups"),
    "resnet18_25m": ("groups",),
}


def build_model(name: str, input_shape: Sequence[int], seed: int, **params: object) -> nn.Module:
    """Build model ``name`` for samples of ``input_shape``, initialised from ``seed``.

    ``params`` per model: mlp ``hidden`` (sizes, default (64, 32)); cnn ``hidden`` (head width,
    default 24); cnn_gn ``width`` (first stage's channels, default 16) and ``groups``
    (GroupNorm groups, default 4); resnet18 ``width`` (default 64) and ``groups`` (default 8);
    multimodal ``clinical_features`` (required) and the
    embedding widths. An unknown name or parameter raises ValueError listing what is accepted.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}: use one of {', '.join(MODEL_NAMES)}")
    unknown = sorted(set(params) - set(_PARAMETERS[name]))
    if unknown:
        accepted = ", ".join(_PARAMETERS[name]) or "none"
        raise ValueError(f"model {name!r} does not take {unknown}; it accepts: {accepted}")
    shape = tuple(int(d) for d in input_shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"input_shape must be a non-empty tuple of sizes >= 1, got {input_shape}")
    # Seed a private copy of the RNG so building a model never shifts the caller's stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _BUILDERS[name](shape, **params)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (what gossip sends each round)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
