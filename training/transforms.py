"""Train and evaluation transforms (torchvision v2): uint8 tensor or PIL image in, normalized float (C, r, r) out."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torchvision.transforms import v2

TrainCrop = Literal["random_resized_crop", "pad_crop", "resize"]
#: How a test image is shown at a resolution other than the training one.
#: ``"zoom"``: the whole image resized to the resolution (the object grows with the grid);
#: ``"canvas"``: the image at its training size, unscaled, in the centre of a blank (zero-pixel) canvas of
#: the resolution (more tokens, same object size); a canvas smaller than the image is a centre crop.
EvalProtocol = Literal["zoom", "canvas"]
EVAL_PROTOCOLS: tuple[str, ...] = get_args(EvalProtocol)


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
    resolution: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    crop_pct: float = 1.0,
    protocol: EvalProtocol = "zoom",
    train_resolution: int | None = None,
) -> v2.Compose:
    """The test view of an image at ``resolution`` x ``resolution`` (normalized float (C, r, r)).

    ``protocol="zoom"``: resize the short side to ``resolution / crop_pct``, center-crop ``resolution``.
    ``protocol="canvas"``: build the ``train_resolution`` view exactly as "zoom" does, then center it on
    a blank canvas of ``resolution`` (zero pixels, padded before normalization), or center-crop it when
    ``resolution < train_resolution``. ``crop_pct=1`` shows the whole (square) image; ImageNet uses 0.875.
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct={crop_pct} must be in (0, 1]")
    if protocol not in EVAL_PROTOCOLS:
        raise ValueError(f"protocol={protocol!r} is not one of {list(EVAL_PROTOCOLS)}")
    if protocol == "canvas" and train_resolution is None:
        raise ValueError("protocol='canvas' needs train_resolution (the size of the image on the canvas)")
    shown = resolution if protocol == "zoom" else train_resolution
    steps: list[v2.Transform] = [v2.ToImage(), v2.Resize(round(shown / crop_pct), antialias=True), v2.CenterCrop(shown)]
    if protocol == "canvas":
        steps.append(v2.CenterCrop(resolution))  # pads with zeros when the canvas is larger
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)
