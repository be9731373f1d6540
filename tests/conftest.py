"""Fixtures shared by the training tests (tests/test_train.py, test_study.py, test_training_*.py), and the
``gpu`` marker's skip on machines without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` are skipped, with the reason, where no CUDA device is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False); run `python -m pytest -m gpu` on a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake copy of every dataset type (tests/test_data.py `write_all`): fashion/, cifar/, folder/, imagenet100/."""
    from test_data import write_all

    return write_all(tmp_path_factory.mktemp("data"))
