"""DTensor sharding rules for ``ndrope::rotate``, ``ndrope::rotate_pair`` and ``ndrope::rotate_backward``.

The rotation acts on each row of x (..., N, D) alone, so x may be sharded on any dim but the last
(batch, heads, tokens) and the output keeps x's placement; the tables (..., N, P) follow the row dims
they vary over (sharded to match, or replicated and sliced locally) and stay replicated on the dims
they broadcast over. It is linear in x, so a partial x gives a partial output. The table gradients sum
over the rows a table is broadcast to: a sharded broadcast dim makes them partial sums, reduced by
DTensor when they are used. Sharding x on its last dim (the channel pairs) is refused with an error
naming the placement: serving it would all-gather x.

Registered on first use (`register`), so that ``import ndrope`` does not import torch.distributed.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


def _is_shard_of_last_dim(placement: Any, rank: int) -> bool:
    return placement.is_shard() and placement.dim % rank == rank - 1


def _check_x(name: str, spec: Any) -> None:
    rank = len(spec.shape)
    for mesh_dim, placement in enumerate(spec.placements):
        if _is_shard_of_last_dim(placement, rank):
            raise ValueError(
                f"{name} is sharded on its last dim ({placement!r} on mesh dim {mesh_dim}, shape {tuple(spec.shape)}): "
                "RoPE rotates channel pairs within that dim; shard x on batch, heads or tokens instead "
                "(any dim but the last), or replicate it"
            )


def _table_placement(placement: Any, x_rank: int, table_shape: tuple[int, ...]) -> Any:
    """The table's placement when x (rank ``x_rank``) is placed as ``placement``: the table's dims align
    with x's from the right; on a dim the table broadcasts over (missing or size 1) it is replicated."""
    from torch.distributed.tensor import Replicate, Shard

    if not placement.is_shard():
        return Replicate()
    table_dim = placement.dim % x_rank - (x_rank - len(table_shape))
    if table_dim < 0 or table_shape[table_dim] == 1:
        return Replicate()
    return Shard(table_dim)


def _x_placements(x_rank: int) -> list[Any]:
    """Every placement of x the rotation serves on one mesh dim: replicate, shard any dim but the last, partial."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    return [Replicate(), *(Shard(dim) for dim in range(x_rank - 1)), Partial()]


def _forward_placements(x_rank: int, table_shape: tuple[int, ...]) -> list[tuple[Any, Any]]:
    """(x's placement, the tables' placement) for every x placement the forward rotation serves: the tables
    follow a shard of x (`_table_placement`) and are replicated for a partial x (the rotation is linear in x)."""
    from torch.distributed.tensor import Replicate

    return [(placement, Replicate() if placement.is_partial() else _table_placement(placement, x_rank, table_shape))
            for placement in _x_placements(x_rank)]


def _rotate_rule(x: Any, cos: Any, sin: Any, interleaved: bool, inverse: bool) -> list[tuple[list, list]]:
    _check_x("x", x)
    return [([placement], [placement, table, table, None, None])
            for placement, table in _forward_placements(len(x.shape), tuple(cos.shape))]


def _rotate_pair_rule(
    q: Any, k: Any, cos: Any, sin: Any, interleaved: bool, inverse: bool
) -> list[tuple[list, list]]:
    """q and k placed alike (sharded on the same row dim, e.g. heads), each as `_rotate_rule` places x."""
    _check_x("q", q)
    _check_x("k", k)
    return [([placement, placement], [placement, placement, table, table, None, None])
            for placement, table in _forward_placements(len(q.shape), tuple(cos.shape))]


def _rotate_backward_rule(
    grad: Any, x: Any, cos: Any, sin: Any, interleaved: bool, inverse: bool
) -> list[tuple[list, list]]:
    from torch.distributed.tensor import Partial, Replicate

    _check_x("grad", grad)
    _check_x("x", x)
    rank, table_shape = len(x.shape), tuple(cos.shape)
    rules = [
        ([Replicate()] * 3, [Replicate()] * 4 + [None, None]),
        ([Partial()] * 3, [Partial(), Replicate(), Replicate(), Replicate(), None, None]),  # linear in grad
    ]
    for placement in _x_placements(rank)[1:-1]:  # x and grad sharded alike on one row dim
        table = _table_placement(placement, rank, table_shape)
        table_grad = Partial() if table.is_replicate() else table  # summed over a sharded broadcast dim
        rules.append(([placement, table_grad, table_grad], [placement, placement, table, table, None, None]))
    return rules


@functools.cache
def register() -> None:
    """Register the rules with DTensor (once per process; a no-op where torch.distributed is unavailable)."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.tensor.experimental import register_sharding

    register_sharding(torch.ops.ndrope.rotate.default)(_rotate_rule)
    register_sharding(torch.ops.ndrope.rotate_pair.default)(_rotate_pair_rule)
    register_sharding(torch.ops.ndrope.rotate_backward.default)(_rotate_backward_rule)
