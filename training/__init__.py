"""Training, multi-resolution evaluation and the position-encoding study for `vit` models (Lightning).

Two commands: `train.py` (`training.cli.ViTCLI`, a LightningCLI with ``fit`` / ``validate`` / ``test`` /
``predict``) and ``python -m training.study`` (`training.study.run_study`, which runs train.py per run).
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use (PEP 562), so that `training.idx` can be imported without lightning/torchvision.
_EXPORTS = {
    "CIFAR10Data": "data",
    "CIFAR100Data": "data",
    "FashionMNISTData": "data",
    "ImageDataModule": "data",
    "ImageFolderData": "data",
    "split_indices": "data",
    "ImageClassifier": "module",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'training' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value

__all__ = [
    "CIFAR10Data",
    "CIFAR100Data",
    "FashionMNISTData",
    "ImageClassifier",
    "ImageDataModule",
    "ImageFolderData",
    "split_indices",
]
