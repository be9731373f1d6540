"""Training, multi-resolution evaluation and the position-encoding study for `vit` models (Lightning).

`train.py` is the command line: one `training.cli.ViTCLI` with ``fit`` / ``validate`` / ``test`` /
``predict`` and ``study`` (`training.study.run_study`).
"""

from .data import CIFAR10Data, CIFAR100Data, FashionMNISTData, ImageDataModule, ImageFolderData, split_indices
from .module import ImageClassifier

__all__ = [
    "CIFAR10Data",
    "CIFAR100Data",
    "FashionMNISTData",
    "ImageClassifier",
    "ImageDataModule",
    "ImageFolderData",
    "split_indices",
]
