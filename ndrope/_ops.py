"""The rotation as registered torch ops: ``ndrope::rotate``, ``ndrope::rotate_pair`` and ``ndrope::rotate_backward``.

RoPE is memory-bound: at best it reads x once and writes the output once. ``ndrope::rotate`` does
that on CPU with the C++ kernel (`_kernel`), on CUDA with the Triton kernel (`_triton`, imported on
the first CUDA call), and with ``mul`` + ``addcmul_`` written straight into the output elsewhere (or
where a kernel is unavailable or does not take the operands: float64 on CUDA, for one). Being
registered ops with fake implementations, autograd formulas and vmap rules, each is a single node for
``torch.compile``, ``torch.export`` and fake tensors. ``ndrope::rotate_pair`` rotates q and k by the
same tables in one call (one kernel launch on CUDA).

Under ``torch.compile`` (AOTDispatcher's functionalization) the CUDA ops are replaced by their Triton
launch, recorded through ``torch.library.wrap_triton`` as ``torch.library.triton_op`` does, so Inductor
compiles the kernel into its graph; with `set_compiled_rotation` ``("formula")`` `ndrope.apply_rotary`
hands Inductor the plain formula to fuse instead, on any device. ``torch.export`` keeps the ops.

Autograd: the output is R(angle) x, so d out / d x is R(-angle): the backward is the same op with
``inverse=True`` and saves only the cos/sin tables (plus x when the angles need a gradient, as for
learned RoPE-Mixed frequencies, whose gradients ``ndrope::rotate_backward`` computes in the same pass).
The formula is registered on the ops and also wrapped in `Rotate` / `RotatePair`, the
autograd.Functions that `ndrope.apply_rotary` / `ndrope.apply_rotary_pair` call: torch.func transforms
(grad, jacrev, vmap of grad) reject ops whose autograd comes from ``register_autograd``
(pytorch/pytorch#168393), but accept an autograd.Function with a ``setup_context``. Forward-mode AD
(jvp, hessian) is not provided: Dynamo cannot trace an autograd.Function with a custom ``jvp``, and
``torch.compile(fullgraph=True)`` matters more.

Inputs, as `ndrope.apply_rotary` prepares them: x (..., N, D) whose rows (..., N) are the output's,
cos/sin (..., N, P) broadcastable to those rows, both in the compute dtype (float32 or float64, at
least x's precision), unit stride on the last dim. Called directly, the ops take any strides (the
kernels run only on unit-stride last dims, the formula on the rest) and refuse tables on another
device than x.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from types import ModuleType
from typing import Any, Literal

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

from . import _kernel
from ._checks import check_choice


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


def _rotate_formula(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool) -> Tensor:
    """The same rotation without in-place writes, for Inductor to fuse (`set_compiled_rotation`)."""
    pairs = cos.shape[-1]
    sign = -1.0 if inverse else 1.0
    x1, x2 = (t.to(cos.dtype) for t in _pairs(x, pairs, interleaved))
    out1, out2 = x1 * cos - sign * x2 * sin, x2 * cos + sign * x1 * sin
    rotated = torch.stack((out1, out2), dim=-1).flatten(-2) if interleaved else torch.cat((out1, out2), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., 2 * pairs :]), dim=-1)


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


def _use_kernel(x: Tensor, cos: Tensor, sin: Tensor) -> bool:
    return (
        x.layout == torch.strided
        and x.numel() > 0  # an empty tensor has no data pointer, which the kernel refuses
        and x.dtype in _kernel.DTYPE_CODES
        and x.dim() - 1 <= _kernel.MAX_ROW_DIMS
        and x.stride(-1) == 1  # the kernel steps through channels one by one
        and cos.stride(-1) == 1
        and sin.stride(-1) == 1
        and _kernel.library() is not None
    )


_gpu_kernels: ModuleType | None = None
_gpu_failure: BaseException | None = None


def gpu_kernels() -> ModuleType | None:
    """`ndrope._triton`, imported on the first CUDA rotation; None (after one warning) where triton
    cannot be imported, and CUDA tensors then take the torch formula."""
    global _gpu_kernels, _gpu_failure
    if _gpu_kernels is None and _gpu_failure is None:
        try:
            from . import _triton
        except ImportError as error:
            _gpu_failure = error
            warnings.warn(
                f"ndrope: the Triton GPU rotary kernel is unavailable, using the torch formula instead ({error})",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            _gpu_kernels = _triton
    return _gpu_kernels


def _check_devices(op: str, x_name: str, x: Tensor, *others: tuple[str, Tensor]) -> None:
    for name, tensor in others:
        if tensor.device != x.device:
            raise ValueError(
                f"ndrope::{op}: {name} is on {tensor.device} but {x_name} is on {x.device}; "
                f"every operand must be on {x_name}'s device"
            )


def _on_device(x: Tensor) -> contextlib.AbstractContextManager:
    """x's CUDA device made current for the launch (Triton launches on the current device)."""
    if x.device.type == "cuda" and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


#: Per op: its operands as (x, cos, sin, *others) for the kernel's checks, with their names.
_GPU_OPERANDS = {
    "rotate": (lambda a: (a[0], a[1], a[2]), ("x", "cos", "sin")),
    "rotate_pair": (lambda a: (a[0], a[2], a[3], a[1]), ("q", "cos", "sin", "k")),
    "rotate_backward": (lambda a: (a[1], a[2], a[3], a[0]), ("x", "cos", "sin", "grad")),
}


def _on_gpu(name: str, args: tuple, *, traceable: bool = False) -> Any:
    """Op ``name`` on ``args`` by the Triton kernel, or None where it does not take them (triton
    missing; float64; a strided last dim; a geometry beyond the kernel): the caller runs the formula."""
    operands, names = _GPU_OPERANDS[name]
    x, cos, sin, *others = operands(args)
    if not traceable:
        _check_devices(name, names[0], x, *zip(names[1:], (cos, sin, *others)))
    kernels = gpu_kernels()
    if kernels is None or not kernels.takes(x, cos, sin):
        return None
    if any(other.dtype not in kernels.DTYPES or other.stride(-1) != 1 for other in others):
        return None
    with contextlib.nullcontext() if traceable else _on_device(x):
        return getattr(kernels, name)(*args, traceable=traceable)


#: What ``torch.compile`` turns `ndrope.apply_rotary` / `ndrope.apply_rotary_pair` into: ``"kernel"`` the
#: op with its own kernel (on CUDA the Triton kernel, compiled into Inductor's graph; on CPU the C++
#: kernel, one opaque node), ``"formula"`` the plain formula, which Inductor fuses with its neighbours
#: (the projection before, the attention after) and differentiates itself.
CompiledRotation = Literal["kernel", "formula"]
_compiled_rotation: str = "kernel"


def set_compiled_rotation(choice: CompiledRotation) -> str:
    """Choose what ``torch.compile`` compiles ndrope's rotations into (`CompiledRotation`); returns the
    previous choice. Compiled functions guard on it: a compiled model recompiles when the choice
    changes. Eager calls and ``torch.export`` always use the op."""
    global _compiled_rotation
    previous, _compiled_rotation = _compiled_rotation, check_choice("choice", choice, CompiledRotation)
    return previous


def traces_formula() -> bool:
    """Whether torch.compile (not torch.export) is tracing with the ``"formula"`` choice. Read in the
    traced function, so that Dynamo guards on the choice."""
    return _compiled_rotation == "formula" and torch.compiler.is_compiling() and not torch.compiler.is_exporting()


# Defined with torch.library.Library rather than the custom_op decorator: the dispatcher then calls
# the kernels below directly, without custom_op's per-call wrappers (about 5 us of a ~25 us call).
_LIBRARY = torch.library.Library("ndrope", "DEF")
_LIBRARY.define("rotate(Tensor x, Tensor cos, Tensor sin, bool interleaved, bool inverse) -> Tensor")
_LIBRARY.define(
    "rotate_pair(Tensor q, Tensor k, Tensor cos, Tensor sin, bool interleaved, bool inverse) -> (Tensor, Tensor)"
)
_LIBRARY.define(
    "rotate_backward(Tensor grad, Tensor x, Tensor cos, Tensor sin, bool interleaved, bool inverse) "
    "-> (Tensor, Tensor, Tensor)"
)
#: x (..., N, D) rotated by the angles of cos/sin (..., N, P) (by minus them when ``inverse``)
rotate = torch.ops.ndrope.rotate.default
#: (q, k) each rotated as by `rotate`, in one call (one kernel launch on CUDA for q, k of one shape)
rotate_pair = torch.ops.ndrope.rotate_pair.default
#: (grad_x, grad_cos, grad_sin) of `rotate` in one pass; grad_cos/sin have cos's (unexpanded) shape
rotate_backward = torch.ops.ndrope.rotate_backward.default


def _rotate_cpu(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool) -> Tensor:
    if not _use_kernel(x, cos, sin):
        return _rotate_torch(x, cos, sin, interleaved, inverse)
    out = torch.empty(x.shape, dtype=x.dtype)
    _kernel.run("ndrope_rotate", x, cos.dtype, interleaved, inverse, [x, cos, sin, out])
    return out


def _rotate_cuda(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool) -> Tensor:
    out = _on_gpu("rotate", (x, cos, sin, interleaved, inverse))
    return out if out is not None else _rotate_torch(x, cos, sin, interleaved, inverse)


def _rotate_fake(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


_LIBRARY.impl("rotate", _rotate_torch, "CompositeExplicitAutograd")  # every other device: the torch formula
_LIBRARY.impl("rotate", _rotate_cpu, "CPU")
_LIBRARY.impl("rotate", _rotate_cuda, "CUDA")
torch.library.register_fake("ndrope::rotate", _rotate_fake, lib=_LIBRARY)


def _rotate_pair_any(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool
) -> tuple[Tensor, Tensor]:
    return _rotate_torch(q, cos, sin, interleaved, inverse), _rotate_torch(k, cos, sin, interleaved, inverse)


def _rotate_pair_cpu(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool
) -> tuple[Tensor, Tensor]:
    return _rotate_cpu(q, cos, sin, interleaved, inverse), _rotate_cpu(k, cos, sin, interleaved, inverse)


def _rotate_pair_cuda(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool
) -> tuple[Tensor, Tensor]:
    out = _on_gpu("rotate_pair", (q, k, cos, sin, interleaved, inverse))
    return out if out is not None else _rotate_pair_any(q, k, cos, sin, interleaved, inverse)


def _rotate_pair_fake(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool
) -> tuple[Tensor, Tensor]:
    return _rotate_fake(q, cos, sin, interleaved, inverse), _rotate_fake(k, cos, sin, interleaved, inverse)


_LIBRARY.impl("rotate_pair", _rotate_pair_any, "CompositeExplicitAutograd")
_LIBRARY.impl("rotate_pair", _rotate_pair_cpu, "CPU")
_LIBRARY.impl("rotate_pair", _rotate_pair_cuda, "CUDA")
torch.library.register_fake("ndrope::rotate_pair", _rotate_pair_fake, lib=_LIBRARY)


def _rotate_backward_any(
    grad: Tensor, x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool
) -> tuple[Tensor, Tensor, Tensor]:
    grad_cos, grad_sin = _angle_grads(grad, x, cos, interleaved, inverse)
    return _rotate_torch(grad, cos, sin, interleaved, not inverse), grad_cos, grad_sin


def _rotate_backward_cpu(
    grad: Tensor, x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool
) -> tuple[Tensor, Tensor, Tensor]:
    if not (_use_kernel(x, cos, sin) and grad.stride(-1) == 1):
        return _rotate_backward_any(grad, x, cos, sin, interleaved, inverse)
    grad_x = torch.empty(x.shape, dtype=x.dtype)
    grad_cos, grad_sin = torch.empty(cos.shape, dtype=cos.dtype), torch.empty(sin.shape, dtype=sin.dtype)
    operands = [grad, x, cos, sin, grad_x, grad_cos, grad_sin]  # the tables broadcast over x's rows
    _kernel.run("ndrope_rotate_backward", x, cos.dtype, interleaved, inverse, operands)
    return grad_x, grad_cos, grad_sin


def _rotate_backward_cuda(
    grad: Tensor, x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool
) -> tuple[Tensor, Tensor, Tensor]:
    out = _on_gpu("rotate_backward", (grad, x, cos, sin, interleaved, inverse))
    return out if out is not None else _rotate_backward_any(grad, x, cos, sin, interleaved, inverse)


def _rotate_backward_fake(
    grad: Tensor, x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(cos), torch.empty_like(sin)


_LIBRARY.impl("rotate_backward", _rotate_backward_any, "CompositeExplicitAutograd")
_LIBRARY.impl("rotate_backward", _rotate_backward_cpu, "CPU")
_LIBRARY.impl("rotate_backward", _rotate_backward_cuda, "CUDA")
torch.library.register_fake("ndrope::rotate_backward", _rotate_backward_fake, lib=_LIBRARY)


def _export_keeps_ops() -> bool:
    """Whether torch.export is tracing: it keeps custom ops whole, as it does ``triton_op``s."""
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:  # a torch without it has no such export mode
        return False
    return custom_triton_ops_decomposition_disabled()


_TRACED_TENSORS = (FakeTensor, FunctionalTensor)


def _kernel_when_compiled(mode: FunctionalTensorMode, op: Any, types: tuple, args: tuple, kwargs: dict) -> Any:
    """A FunctionalTensorMode rule for the ops: on CUDA, AOTDispatcher (``torch.compile``) records the
    op's Triton launch, through ``torch.library.wrap_triton``, instead of the op, as
    ``torch.library.triton_op`` does; Inductor then compiles the kernel into its graph. Elsewhere, or
    where the kernel does not take the operands, the op stays one node."""
    plain = all(t is Tensor or issubclass(t, _TRACED_TENSORS) for t in types)  # else a subclass decides
    traceable = hasattr(torch.library, "wrap_triton")  # torch >= 2.6
    if plain and traceable and not kwargs and args[0].device.type == "cuda" and not _export_keeps_ops():
        with mode:
            out = _on_gpu(op._opname, args, traceable=True)
        if out is not None:
            return out
    return mode.__torch_dispatch__(op, types, args, kwargs)


for _name in _GPU_OPERANDS:
    torch.library.register_torch_dispatch(f"ndrope::{_name}", FunctionalTensorMode, _kernel_when_compiled, lib=_LIBRARY)


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
    grad_x, grad_cos, grad_sin = _input_and_angle_grads(grad, x, cos, sin, ctx.interleaved, ctx.inverse)
    return (grad_x if ctx.needs_input_grad[0] else None), grad_cos, grad_sin, None, None


def _input_and_angle_grads(
    grad: Tensor, x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool
) -> tuple[Tensor, Tensor, Tensor]:
    if torch.is_grad_enabled():  # create_graph: stay differentiable
        grad_x = Rotate.apply(grad, cos, sin, interleaved, not inverse)
        return grad_x, *_angle_grads(grad, x, cos, interleaved, inverse)
    return rotate_backward(grad, x, cos, sin, interleaved, inverse)


torch.library.register_autograd("ndrope::rotate", _backward, setup_context=_setup_context, lib=_LIBRARY)


def _setup_pair_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    q, k, cos, sin, interleaved, inverse = inputs
    angles_need_grad = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    ctx.save_for_backward(cos, sin, *((q, k) if angles_need_grad else (None, None)))
    ctx.interleaved, ctx.inverse = interleaved, inverse


def _pair_backward(ctx: Any, grad_q: Tensor, grad_k: Tensor) -> tuple[Tensor | None, ...]:
    cos, sin, q, k = ctx.saved_tensors
    grad_q, grad_k = grad_q.contiguous(), grad_k.contiguous()
    if q is None:
        rotate_grads = RotatePair.apply if torch.is_grad_enabled() else rotate_pair
        return *rotate_grads(grad_q, grad_k, cos, sin, ctx.interleaved, not ctx.inverse), None, None, None, None
    grad_q, cos_q, sin_q = _input_and_angle_grads(grad_q, q, cos, sin, ctx.interleaved, ctx.inverse)
    grad_k, cos_k, sin_k = _input_and_angle_grads(grad_k, k, cos, sin, ctx.interleaved, ctx.inverse)
    needs = ctx.needs_input_grad
    return (grad_q if needs[0] else None), (grad_k if needs[1] else None), cos_q + cos_k, sin_q + sin_k, None, None


torch.library.register_autograd("ndrope::rotate_pair", _pair_backward, setup_context=_setup_pair_context, lib=_LIBRARY)


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


class RotatePair(torch.autograd.Function):
    """``ndrope::rotate_pair`` with the same autograd formula, in the form torch.func accepts."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool) -> tuple[Tensor, Tensor]:
        return rotate_pair(q, k, cos, sin, interleaved, inverse)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
        _setup_pair_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx: Any, grad_q: Tensor, grad_k: Tensor) -> tuple[Tensor | None, ...]:
        return _pair_backward(ctx, grad_q, grad_k)


# Function.apply binds the arguments to forward's signature on every call; inspect.signature returns a
# precomputed __signature__ at once instead of rebuilding it (tens of microseconds per rotation).
Rotate.forward.__signature__ = inspect.signature(Rotate.forward)
RotatePair.forward.__signature__ = inspect.signature(RotatePair.forward)


def _vmap_operands(size: int, in_dims: tuple, xs: list[Tensor], cos: Tensor, sin: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
    """Batch dims go first; every operand gets the same rank, and each x the rows of its broadcast result."""

    def batched(t: Tensor, dim: int | None) -> Tensor:
        return t.unsqueeze(0).expand(size, *t.shape) if dim is None else t.movedim(dim, 0)

    xs = [batched(x, dim) for x, dim in zip(xs, in_dims)]
    cos, sin = batched(cos, in_dims[len(xs)]), batched(sin, in_dims[len(xs) + 1])
    rank = max(t.dim() for t in (*xs, cos))

    def aligned(t: Tensor) -> Tensor:  # insert the missing leading dims after the batch dim
        return t.reshape(t.shape[0], *(1,) * (rank - t.dim()), *t.shape[1:])

    xs, cos, sin = [aligned(x) for x in xs], aligned(cos), aligned(sin)
    xs = [x.expand(*torch.broadcast_shapes(x.shape[:-1], cos.shape[:-1]), x.shape[-1]) for x in xs]
    return xs, cos.contiguous(), sin.contiguous()


def _rotate_vmap(info: Any, in_dims: tuple, x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool):
    (x,), cos, sin = _vmap_operands(info.batch_size, in_dims, [x], cos, sin)
    return rotate(x, cos, sin, interleaved, inverse), 0


def _rotate_pair_vmap(
    info: Any, in_dims: tuple, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool
):
    (q, k), cos, sin = _vmap_operands(info.batch_size, in_dims, [q, k], cos, sin)
    return rotate_pair(q, k, cos, sin, interleaved, inverse), (0, 0)


torch.library.register_vmap("ndrope::rotate", _rotate_vmap, lib=_LIBRARY)
torch.library.register_vmap("ndrope::rotate_pair", _rotate_pair_vmap, lib=_LIBRARY)
