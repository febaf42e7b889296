"""Light image augmentation for local training: random translation by a few pixels.

Chest X-rays are roughly centred but not registered, so a shift of up to two pixels at 28x28
(about 7% of the width) is a plausible variation of the same patient; flips and rotations are
not used (left and right differ in anatomy, e.g. the heart). Each sample is shifted on its own
from the trainer's generator, so under DP-SGD a patient's augmented image depends on that
patient's image only and per-sample clipping still bounds its influence. Pixels shifted in
are zero (the images' black border).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENTATIONS: tuple[str, ...] = ("none", "shift")
MAX_SHIFT = 2  # pixels, each direction


def augment_batch(x: torch.Tensor, name: str, generator: torch.Generator) -> torch.Tensor:
    """The batch ``x`` (B, C, H, W) augmented by ``name``; "none" returns ``x`` itself."""
    if name == "none" or len(x) == 0:
        return x
    if name != "shift":
        raise ValueError(f"unknown augmentation {name!r}: use one of {AUGMENTATIONS}")
    if x.ndim != 4:
        raise ValueError(f"augmentation 'shift' needs images (B, C, H, W), got {tuple(x.shape)}")
    return random_shift(x, MAX_SHIFT, generator)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own integer offset in [-max_shift, max_shift] per axis."""
    batch, _, height, width = x.shape
    s = int(max_shift)
    offsets = torch.randint(0, 2 * s + 1, (batch, 2), generator=generator)
    padded = F.pad(x, (s, s, s, s))
    rows = (torch.arange(height)[None, :] + offsets[:, :1])[:, :, None]  # (B, H, 1)
    cols = (torch.arange(width)[None, :] + offsets[:, 1:])[:, None, :]  # (B, 1, W)
    picked = padded[torch.arange(batch)[:, None, None], :, rows, cols]  # (B, H, W, C)
    return picked.permute(0, 3, 1, 2).contiguous()
