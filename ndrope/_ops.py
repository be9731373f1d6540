"""The rotation as registered torch ops: ``ndrope::rotate`` and ``ndrope::rotate_backward``.

RoPE is memory-bound: at best it reads x once and writes the output once. ``ndrope::rotate`` does
that on CPU with the C++ kernel (`_kernel`), and with ``mul`` + ``addcmul_`` written straight into the
output on other devices (or where the kernel is unavailable). Being one registered op with a fake
implementation, an autograd formula and a vmap rule, it is a single node for ``torch.compile``,
``torch.export`` and fake tensors.

Autograd: the output is R(angle) x, so d out / d x is R(-angle): the backward is the same op with
``inverse=True`` and saves only the cos/sin tables (plus x when the angles need a gradient, as for
learned RoPE-Mixed frequencies, whose gradients ``ndrope::rotate_backward`` computes in the same pass).
The formula is registered on the op and also wrapped in `Rotate`, the autograd.Function that
`ndrope.apply_rotary` calls: torch.func transforms (grad, jacrev, vmap of grad) reject ops whose
autograd comes from ``register_autograd`` (pytorch/pytorch#168393), but accept an autograd.Function
with a ``setup_context``. Forward-mode AD (jvp, hessian) is not provided: Dynamo cannot trace an
autograd.Function with a custom ``jvp``, and ``torch.compile(fullgraph=True)`` matters more.

Inputs, as `ndrope.apply_rotary` prepares them: x (..., N, D) whose rows (..., N) are the output's,
cos/sin (..., N, P) broadcastable to those rows, both in the compute dtype (float32 or float64, at
least x's precision), unit stride on the last dim.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from . import _kernel


def _pairs(t: Tensor, pairs: int, interleaved: bool) -> tuple[Tensor, Tensor]:
    """The two members of every rotated pair: channels (2j, 2j + 1), or (j, j + P) in the half layout."""
    if interleaved:
        return t[..., 0 : 2 * pairs : 2], t[..., 1 : 2 * pairs : 2]
    return t[..., :pairs], t[..., pairs : 2 * pairs]


def _rotate_torch(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool) -> Tensor:
    """About 2.5 passes over x on any device: out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin."""
    pairs = cos.shape[-1]
    sign = -1.0 if inverse else 1.0
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x1, x2 = _pairs(x, pairs, interleaved)
    out1, out2 = _pairs(out, pairs, interleaved)
    for target, a, b, weight in ((out1, x1, x2, -sign), (out2, x2, x1, sign)):
        if x.dtype == cos.dtype:
            torch.mul(a, cos, out=target).addcmul_(b, sin, value=weight)
        else:  # rotate at the tables' precision and round once
            target.copy_(torch.mul(a, cos).addcmul_(b, sin, value=weight))
    out[..., 2 * pairs :] = x[..., 2 * pairs :]
    return out


def _angle_grads(grad: Tensor, x: Tensor, cos: Tensor, interleaved: bool, inverse: bool) -> tuple[Tensor, Tensor]:
    """d loss / d cos and d loss / d sin summed to cos's shape (the tables broadcast over x's rows)."""
    pairs = cos.shape[-1]
    g1, g2 = (t.to(cos.dtype) for t in _pairs(grad, pairs, interleaved))
    x1, x2 = (t.to(cos.dtype) for t in _pairs(x, pairs, interleaved))
    grad_cos = g1 * x1 + g2 * x2
    grad_sin = g2 * x1 - g1 * x2
    if inverse:
        grad_sin = -grad_sin
    return grad_cos.sum_to_size(cos.shape), grad_sin.sum_to_size(cos.shape)


def _use_kernel(x: Tensor) -> bool:
    return (
        x.layout == torch.strided
        and x.numel() > 0  # an empty tensor has no data pointer, which the kernel refuses
        and x.dtype in _kernel.DTYPE_CODES
        and x.dim() - 1 <= _kernel.MAX_ROW_DIMS
        and _kernel.library() is not None
    )


# Defined with torch.library.Library rather than the custom_op decorator: the dispatcher then calls
# the kernels below directly, without custom_op's per-call wrappers (about 5 us of a ~25 us call).
_LIBRARY = torch.library.Library("ndrope", "DEF")
_LIBRARY.define("rotate(Tensor x, Tensor cos, Tensor sin, bool interleaved, bool inverse) -> Tensor")
_LIBRARY.define(
    "rotate_backward(Tensor grad, Tensor x, Tensor cos, Tensor sin, bool interleaved, bool inverse) "
    "-> (Tensor, Tensor, Tensor)"
)
#: x (..., N, D) rotated by the angles of cos/sin (..., N, P) (by minus them when ``inverse``)
rotate = torch.ops.ndrope.rotate.default
#: (grad_x, grad_cos, grad_sin) of `rotate` in one pass; grad_cos/sin have cos's (unexpanded) shape
rotate_backward = torch.ops.ndrope.rotate_backward.default


def _rotate_cpu(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool) -> Tensor:
    if not _use_kernel(x):
        return _rotate_torch(x, cos, sin, interleaved, inverse)
    out = torch.empty(x.shape, dtype=x.dtype)
    _kernel.run("ndrope_rotate", x, cos.dtype, interleaved, inverse, [x, cos, sin, out])
    return out


def _rotate_fake(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


_LIBRARY.impl("rotate", _rotate_torch, "CompositeExplicitAutograd")  # every device: the torch formula
_LIBRARY.impl("rotate", _rotate_cpu, "CPU")
torch.library.register_fake("ndrope::rotate", _rotate_fake, lib=_LIBRARY)


def _rotate_backward_any(
    grad: Tensor, x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool
) -> tuple[Tensor, Tensor, Tensor]:
    grad_cos, grad_sin = _angle_grads(grad, x, cos, interleaved, inverse)
    return _rotate_torch(grad, cos, sin, interleaved, not inverse), grad_cos, grad_sin


def _rotate_backward_cpu(
    grad: Tensor, x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool
) -> tuple[Tensor, Tensor, Tensor]:
    if not _use_kernel(x):
        return _rotate_backward_any(grad, x, cos, sin, interleaved, inverse)
    grad_x = torch.empty(x.shape, dtype=x.dtype)
    grad_cos, grad_sin = torch.empty(cos.shape, dtype=cos.dtype), torch.empty(sin.shape, dtype=sin.dtype)
    operands = [grad, x, cos, sin, grad_x, grad_cos, grad_sin]  # the tables broadcast over x's rows
    _kernel.run("ndrope_rotate_backward", x, cos.dtype, interleaved, inverse, operands)
    return grad_x, grad_cos, grad_sin


def _rotate_backward_fake(
    grad: Tensor, x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(cos), torch.empty_like(sin)


_LIBRARY.impl("rotate_backward", _rotate_backward_any, "CompositeExplicitAutograd")
_LIBRARY.impl("rotate_backward", _rotate_backward_cpu, "CPU")
torch.library.register_fake("ndrope::rotate_backward", _rotate_backward_fake, lib=_LIBRARY)


def _setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, cos, sin, interleaved, inverse = inputs
    angles_need_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    ctx.save_for_backward(cos, sin, x if angles_need_grad else None)
    ctx.interleaved, ctx.inverse = interleaved, inverse


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    cos, sin, x = ctx.saved_tensors
    grad = grad.contiguous()  # e.g. the expanded ones of out.sum()
    if x is None:
        # create_graph (grad mode on in backward) needs the Function, to differentiate this rotation again
        rotate_grad = Rotate.apply if torch.is_grad_enabled() else rotate
        return rotate_grad(grad, cos, sin, ctx.interleaved, not ctx.inverse), None, None, None, None
    if torch.is_grad_enabled():  # create_graph: stay differentiable
        grad_x = Rotate.apply(grad, cos, sin, ctx.interleaved, not ctx.inverse)
        grad_cos, grad_sin = _angle_grads(grad, x, cos, ctx.interleaved, ctx.inverse)
    else:
        grad_x, grad_cos, grad_sin = rotate_backward(grad, x, cos, sin, ctx.interleaved, ctx.inverse)
    return (grad_x if ctx.needs_input_grad[0] else None), grad_cos, grad_sin, None, None


torch.library.register_autograd("ndrope::rotate", _backward, setup_context=_setup_context, lib=_LIBRARY)


class Rotate(torch.autograd.Function):
    """``ndrope::rotate`` with the same autograd formula, in the form torch.func accepts."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool) -> Tensor:
        return rotate(x, cos, sin, interleaved, inverse)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return _backward(ctx, grad)


# Function.apply binds the arguments to forward's signature on every call; inspect.signature returns a
# precomputed __signature__ at once instead of rebuilding it (tens of microseconds per rotation).
Rotate.forward.__signature__ = inspect.signature(Rotate.forward)


def _rotate_vmap(info: Any, in_dims: tuple, x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool):
    """Batch dims go first; every operand gets x's rank, and x the rows of the broadcast result."""
    x_dim, cos_dim, sin_dim = in_dims[:3]
    size = info.batch_size

    def batched(t: Tensor, dim: int | None) -> Tensor:
        return t.unsqueeze(0).expand(size, *t.shape) if dim is None else t.movedim(dim, 0)

    x, cos, sin = batched(x, x_dim), batched(cos, cos_dim), batched(sin, sin_dim)
    rank = max(x.dim(), cos.dim())

    def aligned(t: Tensor) -> Tensor:  # insert the missing leading dims after the batch dim
        return t.reshape(t.shape[0], *(1,) * (rank - t.dim()), *t.shape[1:])

    x, cos, sin = aligned(x), aligned(cos), aligned(sin)
    rows = torch.broadcast_shapes(x.shape[:-1], cos.shape[:-1])
    x = x.expand(*rows, x.shape[-1])
    return rotate(x, cos.contiguous(), sin.contiguous(), interleaved, inverse), 0


torch.library.register_vmap("ndrope::rotate", _rotate_vmap, lib=_LIBRARY)
