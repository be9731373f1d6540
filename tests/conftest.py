"""Fixtures shared by the training tests (tests/test_train.py, test_study.py, test_training_*.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake copy of every dataset type (tests/test_data.py `write_all`): fashion/, cifar/, folder/, imagenet100/."""
    from test_data import write_all

    return write_all(tmp_path_factory.mktemp("data"))
