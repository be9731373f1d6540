"""On-disk dataset readers: ImageFolder class subsets, in-memory images (IDX files: `training.idx`), a transform wrapper.

The loaders return raw samples (a uint8 image tensor (C, h, w) or a PIL image, and an int label);
`Transformed` applies a transform on top, so one decoded dataset can be viewed at several resolutions.
`EpochSampler` makes training repeatable: the augmentation of sample i in epoch e is seeded by
(seed, e, i) alone, whatever the number of workers or devices, and whether or not the run was resumed.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler
from torchvision.datasets import ImageFolder


class ImageTensorDataset(Dataset):
    """Images held in memory as uint8 (N, C, h, w) with int64 labels (N,); item i is (images[i], int label)."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (N, C, h, w), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match {images.shape[0]} images")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])


class SubsetImageFolder(ImageFolder):
    """`ImageFolder` restricted to ``classes`` (e.g. the 100 ImageNet-100 wnids), labelled in the order given."""

    def __init__(self, root: str | os.PathLike, classes: list[str] | None = None, **kwargs: Any) -> None:
        self.subset = classes
        super().__init__(root, **kwargs)

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        found, _ = super().find_classes(directory)
        if self.subset is None:
            return found, {name: i for i, name in enumerate(found)}
        missing = sorted(set(self.subset) - set(found))
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise FileNotFoundError(
                f"{len(missing)} of the {len(self.subset)} listed classes have no folder in {directory}: {shown}"
            )
        return list(self.subset), {name: i for i, name in enumerate(self.subset)}


class EpochSampler(DistributedSampler):
    """`DistributedSampler` (shuffled by seed + epoch) that yields ``(index, sample_seed)`` keys for `Transformed`.

    Being a DistributedSampler, Lightning neither replaces it under DDP nor forgets to call
    ``set_epoch``; with ``num_replicas=1`` it is a seeded per-epoch shuffle. `resume_at` starts one epoch
    part-way, for a fit resumed inside it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume = (-1, 0)  # (epoch, samples of this replica to skip in it)

    def resume_at(self, epoch: int, start: int) -> None:
        """Set the epoch, and start it at this replica's ``start``-th sample (the ones before it were trained on
        before an interruption); later epochs start at 0."""
        if start < 0 or start > self.num_samples:
            raise ValueError(f"start={start} must be in [0, {self.num_samples}] (this replica's samples per epoch)")
        self.set_epoch(epoch)
        self.resume = (epoch, start)

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        start = self.resume[1] if self.resume[0] == self.epoch else 0
        # hash() of a tuple of ints is the same in every process (PYTHONHASHSEED only salts str/bytes).
        return ((i, hash((self.seed, self.epoch, i))) for i in itertools.islice(super().__iter__(), start, None))


class Transformed(Dataset):
    """``base[i]`` = (image, label) with ``transform`` applied to the image.

    A key ``(i, sample_seed)`` (from `EpochSampler`) runs the transform under a CPU RNG seeded with
    ``sample_seed`` and restores the caller's RNG afterwards; a plain int key uses the current RNG.
    """

    def __init__(self, base: Dataset, transform: Callable[[Any], Tensor]) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int]:
        if isinstance(key, tuple):
            index, sample_seed = key
            image, label = self.base[index]
            with torch.random.fork_rng(devices=[]):
                # the CPU generator only: torch.manual_seed also reseeds CUDA, 100x slower per call
                torch.default_generator.manual_seed(sample_seed & 0x7FFF_FFFF_FFFF_FFFF)
                return self.transform(image), label
        image, label = self.base[key]
        return self.transform(image), label
