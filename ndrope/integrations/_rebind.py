"""One instance's forward, routed through ndrope: a copy of its class's forward whose module-level
rotation function names resolve to ndrope's.

transformers and timm attention layers call a module-level function (``apply_rotary_pos_emb``,
``apply_rot_embed_cat``) by its global name. Replacing that name in the modeling module would change every
model of the class in the process; instead the instance gets its own copy of the class's forward, with the
same code and a copy of the module's globals in which those names are ndrope's. Other instances, and the
class, keep the original.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import nn


def _code_names(code: types.CodeType) -> Iterator[str]:
    """Every name a code object and the code nested in it (comprehensions, lambdas) looks up."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_names(const)


def global_names(func: Callable[..., Any]) -> set[str]:
    """The names ``func`` and the functions it wraps (closure cells holding functions) look up."""
    found: set[str] = set()
    stack, seen = [func], set()
    while stack:
        current = stack.pop()
        if not isinstance(current, types.FunctionType) or id(current) in seen:
            continue
        seen.add(id(current))
        found.update(_code_names(current.__code__))
        stack.extend(cell.cell_contents for cell in current.__closure__ or () if _is_filled(cell))
    return found


def calls_any(func: Callable[..., Any], names: Mapping[str, Any] | set[str]) -> bool:
    """Whether ``func``, or a function it wraps, looks up one of ``names``."""
    return bool(set(names) & global_names(func))


def _is_filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018  (an empty cell raises)
    except ValueError:
        return False
    return True


def with_globals(
    func: types.FunctionType, names: Mapping[str, Any], _copies: dict[int, types.FunctionType] | None = None
) -> types.FunctionType:
    """A copy of ``func`` whose global ``names`` resolve to the given objects.

    Functions it wraps (decorators keep them in closure cells, e.g. transformers' ``deprecate_kwarg``) are
    copied the same way, so the whole call chain sees the new names. The module's globals are copied when
    this is called; the original function and its module are not changed.
    """
    copies = {} if _copies is None else _copies
    if id(func) in copies:
        return copies[id(func)]
    namespace = {**func.__globals__, **names} if set(names) & set(_code_names(func.__code__)) else func.__globals__
    copy = types.FunctionType(func.__code__, namespace, func.__name__, func.__defaults__, func.__closure__)
    copies[id(func)] = copy
    if func.__closure__:
        cells = []
        for cell in func.__closure__:
            inner = cell.cell_contents if _is_filled(cell) else None
            if isinstance(inner, types.FunctionType) and calls_any(inner, names):
                cell = types.CellType(with_globals(inner, names, copies))
            cells.append(cell)
        copy = types.FunctionType(func.__code__, namespace, func.__name__, func.__defaults__, tuple(cells))
        copies[id(func)] = copy
    copy.__kwdefaults__ = func.__kwdefaults__
    copy.__dict__.update(func.__dict__)
    copy.__qualname__, copy.__doc__, copy.__module__ = func.__qualname__, func.__doc__, func.__module__
    copy.__annotations__ = dict(func.__annotations__)
    return copy


def routed_forward(module: nn.Module, names: Mapping[str, Any]) -> types.MethodType:
    """``module``'s class forward with ``names`` rebound, bound to ``module`` (assign it to ``module.forward``)."""
    return types.MethodType(with_globals(type(module).forward, names), module)
