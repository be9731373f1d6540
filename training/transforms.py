"""Train and evaluation transforms (torchvision v2): uint8 tensor or PIL image in, normalized float (C, r, r) out."""

from __future__ import annotations

from typing import Literal

import torch
from torchvision.transforms import v2

TrainCrop = Literal["random_resized_crop", "pad_crop", "resize"]


def train_transform(
    img_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    crop: TrainCrop = "random_resized_crop",
    min_scale: float = 0.08,
    padding: int = 4,
    hflip: bool = True,
    randaugment_magnitude: int | None = None,
) -> v2.Compose:
    """Augmentation for training at ``img_size``.

    ``crop``: ``"random_resized_crop"`` (Inception-style, area in [min_scale, 1]), ``"pad_crop"``
    (resize, pad by ``padding`` pixels, random crop back: the CIFAR recipe) or ``"resize"`` (no crop).
    ``randaugment_magnitude``: RandAugment with 2 ops at this magnitude (0..30), or None for none.
    """
    if not 0 < min_scale <= 1:
        raise ValueError(f"min_scale={min_scale} must be in (0, 1]")
    steps: list[v2.Transform] = [v2.ToImage()]
    if crop == "random_resized_crop":
        steps.append(v2.RandomResizedCrop(img_size, scale=(min_scale, 1.0), antialias=True))
    elif crop == "pad_crop":
        steps += [v2.Resize(img_size, antialias=True), v2.RandomCrop(img_size, padding=padding)]
    elif crop == "resize":
        steps.append(v2.Resize((img_size, img_size), antialias=True))
    else:
        raise ValueError(f"crop={crop!r} is not one of 'random_resized_crop', 'pad_crop', 'resize'")
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if randaugment_magnitude is not None:
        steps.append(v2.RandAugment(num_ops=2, magnitude=randaugment_magnitude))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


def eval_transform(
    resolution: int, mean: tuple[float, ...], std: tuple[float, ...], crop_pct: float = 1.0
) -> v2.Compose:
    """Resize the short side to ``resolution / crop_pct`` and center-crop ``resolution`` x ``resolution``.

    ``crop_pct=1`` shows the whole (square) image; ImageNet evaluation uses 0.875.
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct={crop_pct} must be in (0, 1]")
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(round(resolution / crop_pct), antialias=True),
            v2.CenterCrop(resolution),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )
