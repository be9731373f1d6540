"""The GPU rotary kernel: one Triton kernel behind ``ndrope::rotate``, ``ndrope::rotate_pair`` and
``ndrope::rotate_backward`` on CUDA tensors.

Imported on first use only (`ndrope._ops` imports it when a CUDA tensor is rotated): ``import ndrope``
never imports triton, and ``TRITON_INTERPRET=1`` set before this module is imported runs the same
kernel on CPU tensors through Triton's interpreter (how the tests check it on machines without a GPU).

The work, for x (..., N, D) and tables cos/sin (..., N, P) that broadcast against x's rows (..., N):

* x's rows are split by the table: *reduced* dims, over which the table broadcasts (size 1 or
  missing: batch, and heads for a shared table), and *kept* dims, over which it varies (tokens, and
  heads for a per-head table). Adjacent dims that every operand steps through evenly are merged, so
  any x (B, H, N, D) becomes at most 3 reduced + 2 kept dims (``_Geometry``); anything else returns None
  and the caller uses the torch formula.
* One program owns a block of kept rows: it loads their cos/sin once (float32) and walks its share of
  the reduced rows, ``BLOCK_R x BLOCK_K`` rows per step, each row once: read, rotate in float32, round
  once to x's dtype, write; the ``D - 2P`` pass-through channels are copied in the same pass.
* Every operand is read and written through its own strides (a view of a packed qkv projection needs
  no copy; a broadcast table is never expanded); only the last dim must be unit-stride.
* Backward (``BACKWARD``): grad_x is the rotation of grad by minus the angle, in the same pass that
  sums ``d cos = g1 x1 + g2 x2`` and ``d sin = g2 x1 - g1 x2`` over the reduced rows. Each program sums
  its own rows in a fixed order into its slot of a float32 buffer, and the slots are then added by one
  ``torch.sum``: no atomics, so the table gradients are deterministic (bitwise equal run to run).
* ``PAIR``: q and k of the same shape, strides and dtype go through one launch (the second half of
  the programs takes k).

Block sizes are heuristics (about 4096 elements per step, ~1024 programs per launch), not tuned on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

#: x dtypes the kernel takes (the math runs in float32; float64 stays with the torch formula).
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TILE = 4096  # elements of x per step of a program
_TARGET_PROGRAMS = 1024  # enough programs to fill a large GPU several times over
_REDUCED_DIMS, _KEPT_DIMS = 3, 2  # the kernel's canonical rows (R0, R1, R2, K0, K1)


@triton.jit
def _add(a, b):
    return a + b


# The kernel calls Triton builtins and this module's jit functions only (tl.reduce with `_add`, tl.full;
# not tl.sum, tl.zeros or tl.cdiv, which triton.language.standard defines with triton.jit): a copy of
# this module imported with TRITON_INTERPRET=1 then runs in the interpreter even when triton itself
# was imported without it, as in a test process that has compiled models before.
@triton.jit
def _rotary_kernel(
    src, out, x, cos, sin, grad_cos, grad_sin, src_pair, out_pair,  # pointers
    size_r1, size_r2, size_k0, size_k1, n_steps, steps_per_program, n_splits,
    src_r0, src_r1, src_r2, src_k0, src_k1,  # element strides over the canonical rows (R0, R1, R2, K0, K1)
    out_r0, out_r1, out_r2, out_k0, out_k1,
    x_r0, x_r1, x_r2, x_k0, x_k1,
    cos_k0, cos_k1, sin_k0, sin_k1, grad_k0, grad_k1, grad_split,
    PAIRS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_PASS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr, BACKWARD: tl.constexpr, PAIR: tl.constexpr,
):
    """out = R(angle) src for rows (R0, R1, R2, K0, K1) of D channels; R(-angle) with INVERSE. With
    BACKWARD, src is the incoming gradient, out = R(-angle) src (the adjoint of the forward rotation),
    and each program writes its partial d cos / d sin for its kept rows to slot ``split``."""
    pid = tl.program_id(0)
    k_blocks = (size_k1 + BLOCK_K - 1) // BLOCK_K
    per_operand = k_blocks * size_k0 * n_splits
    if PAIR:
        if pid >= per_operand:  # the second half of the programs rotates k
            src = src_pair
            out = out_pair
            pid -= per_operand
    k_block = pid % k_blocks
    split = (pid // k_blocks) % n_splits
    k0 = (pid // k_blocks // n_splits).to(tl.int64)

    k1 = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k1 < size_k1
    k1 = k1.to(tl.int64)
    pair = tl.arange(0, BLOCK_P)
    pair_ok = pair < PAIRS
    table_ok = k_ok[:, None] & pair_ok[None, :]
    c = tl.load(cos + (k0 * cos_k0 + k1 * cos_k1)[:, None] + pair[None, :], mask=table_ok, other=0.0)
    s = tl.load(sin + (k0 * sin_k0 + k1 * sin_k1)[:, None] + pair[None, :], mask=table_ok, other=0.0)
    c = c.to(tl.float32)[None, :, :]  # (1, BLOCK_K, BLOCK_P): shared by the BLOCK_R reduced rows
    s = s.to(tl.float32)[None, :, :]
    if INVERSE != BACKWARD:  # rotate by minus the angle
        s = -s
    src_kept = k0 * src_k0 + k1 * src_k1
    out_kept = k0 * out_k0 + k1 * out_k1
    x_kept = k0 * x_k0 + k1 * x_k1
    grad_c = tl.full((BLOCK_K, BLOCK_P), 0.0, tl.float32)
    grad_s = tl.full((BLOCK_K, BLOCK_P), 0.0, tl.float32)

    r_blocks = (size_r2 + BLOCK_R - 1) // BLOCK_R
    first = split * steps_per_program
    last = tl.minimum(first + steps_per_program, n_steps)
    for step in range(first, last):  # step = (r0, r1, block of BLOCK_R along r2)
        r1 = ((step // r_blocks) % size_r1).to(tl.int64)
        r0 = (step // r_blocks // size_r1).to(tl.int64)
        r2 = (step % r_blocks) * BLOCK_R + tl.arange(0, BLOCK_R)
        rows_ok = (r2 < size_r2)[:, None] & k_ok[None, :]  # (BLOCK_R, BLOCK_K)
        r2 = r2.to(tl.int64)
        src_row = (r0 * src_r0 + r1 * src_r1 + r2 * src_r2)[:, None] + src_kept[None, :]
        out_row = (r0 * out_r0 + r1 * out_r1 + r2 * out_r2)[:, None] + out_kept[None, :]
        if INTERLEAVED:  # channels (2j, 2j + 1): one contiguous load, split into the pair members
            channel = tl.arange(0, 2 * BLOCK_P)
            mask = rows_ok[:, :, None] & (channel < 2 * PAIRS)[None, None, :]
            loaded = tl.load(src + src_row[:, :, None] + channel[None, None, :], mask=mask, other=0.0)
            a, b = tl.split(tl.reshape(loaded.to(tl.float32), (BLOCK_R, BLOCK_K, BLOCK_P, 2)))
        else:  # channels (j, j + P)
            mask = rows_ok[:, :, None] & pair_ok[None, None, :]
            offset = src_row[:, :, None] + pair[None, None, :]
            a = tl.load(src + offset, mask=mask, other=0.0).to(tl.float32)
            b = tl.load(src + offset + PAIRS, mask=mask, other=0.0).to(tl.float32)
        rotated_a = (a * c - b * s).to(out.dtype.element_ty)
        rotated_b = (b * c + a * s).to(out.dtype.element_ty)
        if INTERLEAVED:
            rotated = tl.reshape(tl.join(rotated_a, rotated_b), (BLOCK_R, BLOCK_K, 2 * BLOCK_P))
            tl.store(out + out_row[:, :, None] + channel[None, None, :], rotated, mask=mask)
        else:
            offset = out_row[:, :, None] + pair[None, None, :]
            tl.store(out + offset, rotated_a, mask=mask)
            tl.store(out + offset + PAIRS, rotated_b, mask=mask)
        if HEAD_DIM > 2 * PAIRS:  # pass-through channels, copied in the same pass
            rest = 2 * PAIRS + tl.arange(0, BLOCK_PASS)
            rest_mask = rows_ok[:, :, None] & (rest < HEAD_DIM)[None, None, :]
            kept = tl.load(src + src_row[:, :, None] + rest[None, None, :], mask=rest_mask)
            tl.store(out + out_row[:, :, None] + rest[None, None, :], kept, mask=rest_mask)
        if BACKWARD:  # d loss / d (cos, sin) needs the forward input x
            x_row = (r0 * x_r0 + r1 * x_r1 + r2 * x_r2)[:, None] + x_kept[None, :]
            if INTERLEAVED:
                loaded = tl.load(x + x_row[:, :, None] + channel[None, None, :], mask=mask, other=0.0)
                x_a, x_b = tl.split(tl.reshape(loaded.to(tl.float32), (BLOCK_R, BLOCK_K, BLOCK_P, 2)))
            else:
                offset = x_row[:, :, None] + pair[None, None, :]
                x_a = tl.load(x + offset, mask=mask, other=0.0).to(tl.float32)
                x_b = tl.load(x + offset + PAIRS, mask=mask, other=0.0).to(tl.float32)
            grad_c += tl.reduce(a * x_a + b * x_b, 0, _add)
            grad_s += tl.reduce(b * x_a - a * x_b, 0, _add)
    if BACKWARD:
        if INVERSE:
            grad_s = -grad_s
        slot = split.to(tl.int64) * grad_split + (k0 * grad_k0 + k1 * grad_k1)[:, None] + pair[None, :]
        tl.store(grad_cos + slot, grad_c, mask=table_ok)
        tl.store(grad_sin + slot, grad_s, mask=table_ok)


def _aligned_strides(shape: tuple[int, ...], strides: tuple[int, ...], rows: tuple[int, ...]) -> list[int]:
    """An operand's element strides over x's ``rows``, from its shape and strides without the last
    dim: 0 where it has size 1 or no dim (it broadcasts there)."""
    return [0] * (len(rows) - len(shape)) + [0 if size == 1 else step for size, step in zip(shape, strides)]


def _row_strides(tensor: Tensor, rows: tuple[int, ...]) -> list[int]:
    return _aligned_strides(tuple(tensor.shape[:-1]), tensor.stride()[:-1], rows)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


class _Geometry(NamedTuple):
    """x's rows as (R0, R1, R2, K0, K1): reduced dims (the table broadcasts) then kept dims, and every
    operand's strides over them."""

    sizes: tuple[int, ...]
    strides: dict[str, tuple[int, ...]]


def _merged(dims: list[int], rows: tuple[int, ...], strides: dict[str, list[int]]) -> list[tuple[int, dict]]:
    """Adjacent dims merged wherever every operand steps through them evenly (outer = inner * size)."""
    merged: list[tuple[int, dict]] = []
    for dim in dims:
        size, step = rows[dim], {name: values[dim] for name, values in strides.items()}
        if merged and all(merged[-1][1][name] == step[name] * size for name in step):
            merged[-1] = (merged[-1][0] * size, step)
        else:
            merged.append((size, step))
    return merged


def _geometry(rows: tuple[int, ...], table: Tensor, strides: dict[str, list[int]]) -> _Geometry | None:
    """The canonical rows for operands with these row strides (`_row_strides`), or None where they
    need more than 3 reduced or 2 kept dims."""
    table_sizes = [1] * (len(rows) - (table.dim() - 1)) + list(table.shape[:-1])
    dims = [dim for dim, size in enumerate(rows) if size != 1]
    reduced = _merged([dim for dim in dims if table_sizes[dim] == 1], rows, strides)
    kept = _merged([dim for dim in dims if table_sizes[dim] != 1], rows, strides)
    if len(reduced) > _REDUCED_DIMS or len(kept) > _KEPT_DIMS:
        return None
    unit = (1, dict.fromkeys(strides, 0))
    groups = [unit] * (_REDUCED_DIMS - len(reduced)) + reduced + [unit] * (_KEPT_DIMS - len(kept)) + kept
    sizes = tuple(size for size, _ in groups)
    return _Geometry(sizes, {name: tuple(step[name] for _, step in groups) for name in strides})


class _Launch(NamedTuple):
    blocks: dict[str, int]
    n_steps: int
    steps_per_program: int
    n_splits: int
    programs: int


def _block(size: int, limit: int) -> int:
    """The power of two <= ``limit`` that covers ``size`` rows, ``limit`` when ``size`` reaches it. Under
    ``torch.compile(dynamic=True)`` sizes are symbolic: this guards on ``size >= limit`` only (a small
    size is specialised), so a new resolution does not recompile."""
    return limit if size >= limit else min(limit, triton.next_power_of_2(int(size)))


def _plan(sizes: tuple[int, ...], pairs: int, head_dim: int) -> _Launch:
    """Block sizes and how the reduced rows are shared out (``n_splits`` programs per block of kept rows).
    Block sizes are compile-time constants of the kernel; the counts may be symbolic."""
    size_r0, size_r1, size_r2, size_k0, size_k1 = sizes
    block_k = _block(size_k1, 16)
    block_r = _block(size_r2, max(1, _TILE // (block_k * triton.next_power_of_2(head_dim))))
    rest = head_dim - 2 * pairs
    blocks = dict(
        BLOCK_P=triton.next_power_of_2(pairs), BLOCK_PASS=triton.next_power_of_2(rest) if rest else 1,
        BLOCK_R=block_r, BLOCK_K=block_k,
    )
    kept_programs = _cdiv(size_k1, block_k) * size_k0
    n_steps = size_r0 * size_r1 * _cdiv(size_r2, block_r)
    n_splits = torch.sym_min(n_steps, torch.sym_max(1, _cdiv(_TARGET_PROGRAMS, kept_programs)))
    steps_per_program = _cdiv(n_steps, n_splits)
    n_splits = _cdiv(n_steps, steps_per_program)  # no program without rows
    return _Launch(blocks, n_steps, steps_per_program, n_splits, kept_programs * n_splits)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b  # ints or SymInts alike


_POINTERS = dict.fromkeys(("src", "out", "x", "cos", "sin", "grad_cos", "grad_sin", "src_pair", "out_pair"))


def _launch(traceable: bool, programs: int, **arguments) -> None:
    """One launch; pointers not given are None (the kernel's constexpr branches never read them)."""
    # wrap_triton makes the launch a node that make_fx / AOTDispatcher record and Inductor compiles;
    # eager calls skip it (its dispatch costs about a millisecond).
    kernel = torch.library.wrap_triton(_rotary_kernel) if traceable else _rotary_kernel
    kernel[(programs,)](**{**_POINTERS, **arguments}, num_warps=4)


class _Call(NamedTuple):
    """A launch for one geometry, without its tensors: the kernel's integer and constexpr arguments."""

    scalars: dict[str, int | bool]
    programs: int
    n_splits: int


_CALLS: dict[tuple, _Call | None] = {}
_MAX_CALLS = 256


def _call(key: tuple, build: Callable[[], _Call | None], traceable: bool) -> _Call | None:
    """``build()``, kept per geometry ``key`` for eager calls (about 30 us of Python saved per call);
    rebuilt while tracing, where sizes may be symbolic."""
    if traceable:
        return build()
    key = (*key, _TILE, _TARGET_PROGRAMS)
    if key not in _CALLS:
        if len(_CALLS) >= _MAX_CALLS:
            _CALLS.clear()
        _CALLS[key] = build()
    return _CALLS[key]


def _rotation_scalars(geometry: _Geometry, plan: _Launch, pairs: int, head_dim: int, interleaved: bool, inverse: bool) -> dict:
    strides, sizes = geometry.strides, geometry.sizes
    return dict(
        size_r1=sizes[1], size_r2=sizes[2], size_k0=sizes[3], size_k1=sizes[4],
        n_steps=plan.n_steps, steps_per_program=plan.steps_per_program, n_splits=plan.n_splits,
        **_named("src", strides["src"]), **_named("out", strides["out"]), **_named("x", (0,) * len(sizes)),
        cos_k0=strides["cos"][3], cos_k1=strides["cos"][4], sin_k0=strides["sin"][3], sin_k1=strides["sin"][4],
        grad_k0=0, grad_k1=0, grad_split=0,
        PAIRS=pairs, HEAD_DIM=head_dim, **plan.blocks,
        INTERLEAVED=interleaved, INVERSE=inverse, BACKWARD=False, PAIR=False,
    )


def _named(operand: str, strides: tuple[int, ...]) -> dict[str, int]:
    """The kernel's stride arguments of one operand: ``{operand}_r0`` ... ``{operand}_k1``."""
    return {f"{operand}_{dim}": step for dim, step in zip(("r0", "r1", "r2", "k0", "k1"), strides)}


def takes(x: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """Whether the kernel computes this rotation: x float32/bfloat16/float16 and float32 tables with
    at least one pair, all unit-stride on the last dim (the caller runs the torch formula otherwise)."""
    return (
        x.dtype in DTYPES
        and cos.dtype == torch.float32
        and sin.dtype == torch.float32
        and cos.shape[-1] > 0
        and x.stride(-1) == 1
        and cos.stride(-1) == 1
        and sin.stride(-1) == 1
    )


def _operand_strides(rows: tuple[int, ...], **operands: Tensor) -> dict[str, list[int]]:
    return {name: _row_strides(tensor, rows) for name, tensor in operands.items()}


def _rotation_call(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool, pair: bool) -> _Call | None:
    rows = tuple(x.shape[:-1])
    out_strides = _aligned_strides(rows, _contiguous_strides(tuple(x.shape))[:-1], rows)  # out is contiguous
    strides = dict(_operand_strides(rows, src=x, cos=cos, sin=sin), out=out_strides)
    geometry = _geometry(rows, cos, strides)
    if geometry is None:
        return None
    plan = _plan(geometry.sizes, int(cos.shape[-1]), int(x.shape[-1]))
    scalars = _rotation_scalars(geometry, plan, int(cos.shape[-1]), int(x.shape[-1]), interleaved, inverse)
    scalars["PAIR"] = pair
    return _Call(scalars, (2 if pair else 1) * plan.programs, plan.n_splits)


def rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool, *, traceable: bool = False) -> Tensor | None:
    """x (..., N, D) rotated by cos/sin (..., N, P) broadcastable to its rows, in a new contiguous
    tensor of x's shape and dtype; None where the geometry does not fit the kernel (see `_geometry`)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    key = ("rotate", x.shape, x.stride(), cos.shape, cos.stride(), sin.stride(), interleaved, inverse)
    call = _call(key, lambda: _rotation_call(x, cos, sin, interleaved, inverse, pair=False), traceable)
    if call is None:
        return None
    _launch(traceable, call.programs, **call.scalars, src=x, out=out, cos=cos, sin=sin)
    return out


def rotate_pair(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool, *, traceable: bool = False
) -> tuple[Tensor, Tensor] | None:
    """q and k rotated by the same tables: one launch when they have the same shape, strides and dtype
    (self-attention), two otherwise; None where either geometry does not fit the kernel."""
    if q.shape != k.shape or q.stride() != k.stride() or q.dtype != k.dtype or q.numel() == 0:
        out_q = rotate(q, cos, sin, interleaved, inverse, traceable=traceable)
        out_k = rotate(k, cos, sin, interleaved, inverse, traceable=traceable)
        return None if out_q is None or out_k is None else (out_q, out_k)
    key = ("pair", q.shape, q.stride(), cos.shape, cos.stride(), sin.stride(), interleaved, inverse)
    call = _call(key, lambda: _rotation_call(q, cos, sin, interleaved, inverse, pair=True), traceable)
    if call is None:
        return None
    out_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    out_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _launch(traceable, call.programs, **call.scalars, src=q, out=out_q, src_pair=k, out_pair=out_k, cos=cos, sin=sin)
    return out_q, out_k


def _backward_call(grad: Tensor, x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool) -> _Call | None:
    rows = tuple(x.shape[:-1])
    table_shape = tuple(cos.shape)
    strides = _operand_strides(rows, src=grad, x=x, cos=cos, sin=sin)
    strides["out"] = _aligned_strides(rows, _contiguous_strides(tuple(x.shape))[:-1], rows)  # grad_x is contiguous
    strides["slot"] = _aligned_strides(table_shape[:-1], _contiguous_strides(table_shape)[:-1], rows)
    geometry = _geometry(rows, cos, strides)
    if geometry is None:
        return None
    plan = _plan(geometry.sizes, int(cos.shape[-1]), int(x.shape[-1]))
    scalars = _rotation_scalars(geometry, plan, int(cos.shape[-1]), int(x.shape[-1]), interleaved, inverse)
    slot = geometry.strides["slot"]
    scalars.update(
        **_named("x", geometry.strides["x"]), grad_k0=slot[3], grad_k1=slot[4], grad_split=cos.numel(), BACKWARD=True
    )
    return _Call(scalars, plan.programs, plan.n_splits)


def rotate_backward(
    grad: Tensor, x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool, *, traceable: bool = False
) -> tuple[Tensor, Tensor, Tensor] | None:
    """(grad_x, grad_cos, grad_sin) of `rotate` in one pass over grad and x (both x's shape);
    grad_cos/sin have cos's shape and strides (``empty_like``), summed in float32 over the rows the
    tables broadcast over, deterministically: each program writes its partial sums to its own slot
    of a float32 buffer (n_splits, *cos.shape), and one ``torch.sum`` adds the slots in a fixed
    order. None where the geometry does not fit the kernel."""
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grad_cos, grad_sin = torch.empty_like(cos), torch.empty_like(sin)
    if x.numel() == 0:
        return grad_x, grad_cos.zero_(), grad_sin.zero_()
    key = ("backward", x.shape, grad.stride(), x.stride(), cos.shape, cos.stride(), sin.stride(), interleaved, inverse)
    call = _call(key, lambda: _backward_call(grad, x, cos, sin, interleaved, inverse), traceable)
    if call is None:
        return None
    # the kernel writes cos-shaped contiguous slots: grad_cos itself when it is one and one slot suffices
    direct = call.n_splits == 1 and grad_cos.is_contiguous() and grad_sin.is_contiguous()
    if direct:
        slots_cos, slots_sin = grad_cos, grad_sin
    else:
        slots_cos = torch.empty((call.n_splits, *cos.shape), dtype=torch.float32, device=x.device)
        slots_sin = torch.empty_like(slots_cos)
    tensors = dict(src=grad, out=grad_x, x=x, cos=cos, sin=sin, grad_cos=slots_cos, grad_sin=slots_sin)
    _launch(traceable, call.programs, **call.scalars, **tensors)
    if not direct:
        torch.sum(slots_cos, dim=0, out=grad_cos)
        torch.sum(slots_sin, dim=0, out=grad_sin)
    return grad_x, grad_cos, grad_sin
