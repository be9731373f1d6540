"""Training, multi-resolution evaluation and the position-encoding study for `vit` models (Lightning).

`train.py` is the command line: ``fit`` / ``validate`` / ``test`` (`training.cli.ViTCLI`) and ``study``
(`training.study.run_study`).
"""

from .data import CIFAR10Data, CIFAR100Data, FashionMNISTData, ImageDataModule, ImageFolderData
from .module import ImageClassifier
from .net import ViTSpec

__all__ = [
    "CIFAR10Data",
    "CIFAR100Data",
    "FashionMNISTData",
    "ImageClassifier",
    "ImageDataModule",
    "ImageFolderData",
    "ViTSpec",
]
