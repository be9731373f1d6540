"""The ``>>>`` examples in the docstrings of `ndrope` and `vit` run and print what they say."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import ndrope
import vit


def modules(package) -> list[str]:
    return [package.__name__] + [info.name for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]


@pytest.mark.parametrize("name", modules(ndrope) + modules(vit))
def test_docstring_examples_run(name: str) -> None:
    try:
        module = importlib.import_module(name)
    except ImportError as error:  # an optional dependency (triton, transformers) is missing here
        pytest.skip(f"{name} needs a package that is not installed: {error}")
    results = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert results.failed == 0, f"{results.failed} of {results.attempted} examples in {name} failed (see the output above)"


def test_the_examples_are_there() -> None:
    """The check above can fail: the packages carry examples (a docstring rewrite must keep them)."""
    examples = {
        name: sum(len(test.examples) for test in doctest.DocTestFinder().find(importlib.import_module(name)))
        for name in ("ndrope.modules", "ndrope.positions", "vit", "vit.model")
    }
    assert all(count > 0 for count in examples.values()), examples
