"""Fast paths behind `ndrope.functional.apply_rotary`: read x once, write the output once.

RoPE is memory-bound. The usual formulas (rotate_half, timm's ``rot``, rotary-embedding-torch) make
5-13 passes over q and k in eager mode on CPU and keep full-size temporaries for backward. Here every
path runs inside one autograd Function whose backward is the rotation by the negative angle, so it
saves only the (broadcast) cos/sin tables, plus x when the angles themselves need a gradient
(learned RoPE-Mixed frequencies).

Backends, chosen by the ``NDROPE_BACKEND`` environment variable or `use_backend`:
  * ``"cpp"``: a C++ CPU kernel (one pass per row, float math, OpenMP over rows) with a plain C ABI,
    compiled with the system compiler on first use (about a second) into
    ``$TORCH_EXTENSIONS_DIR/ndrope`` (default ``~/.cache/torch_extensions/ndrope``) and called via ctypes.
  * ``"torch"``: ``mul`` + ``addcmul_`` written straight into the output, on any device; ~2.5 passes.
  * ``"reference"``: `ndrope.functional.rotate_reference`, the plain autograd formula.
  * ``"auto"`` (default): ``"cpp"`` for CPU tensors when the kernel builds, ``"torch"`` otherwise
    (a failed build warns once). Under ``torch.compile``/``torch.export`` and ``torch.jit.trace`` the
    reference formula is traced instead; the compiler fuses it into one kernel on its own, which is
    the fused path for GPUs.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import subprocess
import tempfile
import warnings
from typing import Any, Iterator, Literal

import torch
from torch import Tensor

from ._checks import check_choice

Backend = Literal["auto", "cpp", "torch", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "cpp", "torch", "reference")

_backend: str = check_choice("NDROPE_BACKEND", os.environ.get("NDROPE_BACKEND", "auto"), BACKENDS)


def get_backend() -> str:
    """The selected backend name (possibly ``"auto"``)."""
    return _backend


def set_backend(name: Backend) -> None:
    """Select the backend for every later `apply_rotary` call in this process."""
    global _backend
    _backend = check_choice("backend", name, BACKENDS)


@contextlib.contextmanager
def use_backend(name: Backend) -> Iterator[None]:
    """Select the backend inside a ``with`` block (process-wide, not per thread)."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def resolve_backend(x: Tensor) -> str:
    """The backend `apply_rotary` will use for x: ``"cpp"``, ``"torch"`` or ``"reference"``."""
    if _backend == "reference" or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return "reference"  # tracers record torch ops; they would not see the kernel
    if _backend == "torch":
        return "torch"
    if x.device.type != "cpu" or x.layout != torch.strided:
        if _backend == "cpp":
            raise ValueError(f"backend='cpp' takes dense CPU tensors, but x is {x.layout} on {x.device}; use 'auto'")
        return "torch"
    if cpp_available():
        return "cpp"
    if _backend == "cpp":
        raise RuntimeError(f"backend='cpp' was requested but the C++ kernel did not build: {_build_error}")
    return "torch"


def rotate(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool, backend: str) -> Tensor:
    """Rotate x (..., N, D) by cos/sin (..., N, P) with a fast backend; inputs already validated.

    The math runs in ``promote(x.dtype, cos.dtype, float32)``, the result is x's dtype (as in
    `rotate_reference`). Leading dims broadcast; the output is contiguous.
    """
    if cos.device != x.device or sin.device != x.device:
        raise ValueError(f"angles are on {cos.device} but x is on {x.device}; move them to x's device")
    compute = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), torch.float32)
    if cos.dtype != compute or sin.dtype != compute:
        cos, sin = cos.to(compute), sin.to(compute)
    if cos.stride(-1) != 1 or sin.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()  # small tables; the kernels want unit-stride pairs
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = _rows(x.shape, cos.shape)
    if rows != x.shape[:-1]:
        x = x.expand(*rows, x.shape[-1])
    return _rotate(x, cos, sin, interleaved, False, backend)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool, backend: str) -> Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad):
        return _Rotate.apply(x, cos, sin, interleaved, inverse, backend)
    return _forward(x, cos, sin, interleaved, inverse, backend)  # nothing to differentiate: no autograd node


def _forward(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool, backend: str) -> Tensor:
    """x (..., N, D) with the output's rows, cos/sin (..., N', P) broadcast against them."""
    table = (*x.shape[:-1], cos.shape[-1])
    cos, sin = cos.expand(table), sin.expand(table)
    if backend == "cpp":
        return _rotate_cpp(x, cos, sin, interleaved, inverse)
    return _rotate_torch(x, cos, sin, interleaved, inverse)


def _rows(x_shape: torch.Size, cos_shape: torch.Size) -> tuple[int, ...]:
    """The row shape (..., N) of the output: x's, unless the table has extra or larger leading dims."""
    lead_x, lead_cos = x_shape[:-2], cos_shape[:-2]
    if len(lead_cos) <= len(lead_x) and all(c in (1, s) for c, s in zip(reversed(lead_cos), reversed(lead_x))):
        return x_shape[:-1]  # the common case, without torch.broadcast_shapes' overhead
    return (*torch.broadcast_shapes(lead_x, lead_cos), x_shape[-2])


class _Rotate(torch.autograd.Function):
    """out = R(angle) x; d out / d x is R(-angle), so backward is the same rotation with sin negated."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool, backend: str
    ) -> Tensor:
        angles_need_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        ctx.save_for_backward(cos, sin, x if angles_need_grad else None)
        ctx.interleaved, ctx.inverse, ctx.backend = interleaved, inverse, backend
        return _forward(x, cos, sin, interleaved, inverse, backend)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        cos, sin, x = ctx.saved_tensors
        if grad.stride(-1) != 1:
            grad = grad.contiguous()  # e.g. the expanded ones of out.sum()
        grad_x = grad_cos = grad_sin = None
        if x is not None and ctx.backend == "cpp" and not torch.is_grad_enabled():
            # one pass for grad_x and the angle gradients (a create_graph backward takes the path below)
            grads = _rotate_backward_cpp(grad, x, cos, sin, ctx.interleaved, ctx.inverse, ctx.needs_input_grad[0])
            return (*grads, None, None, None)
        if ctx.needs_input_grad[0]:
            # a create_graph backward goes through _Rotate again, so it stays differentiable
            grad_x = _rotate(grad, cos, sin, ctx.interleaved, not ctx.inverse, ctx.backend)
        if x is not None:
            grad_cos, grad_sin = _angle_grads(grad, x, cos, ctx.interleaved, ctx.inverse)
            grad_cos, grad_sin = grad_cos.sum_to_size(cos.shape), grad_sin.sum_to_size(sin.shape)
        return grad_x, grad_cos, grad_sin, None, None, None


def _pairs(t: Tensor, pairs: int, interleaved: bool) -> tuple[Tensor, Tensor]:
    """The two members of every rotated pair: channels (2j, 2j + 1) or (j, j + P)."""
    if interleaved:
        return t[..., 0 : 2 * pairs : 2], t[..., 1 : 2 * pairs : 2]
    return t[..., :pairs], t[..., pairs : 2 * pairs]


def _rotate_torch(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool) -> Tensor:
    pairs = cos.shape[-1]
    sign = -1.0 if inverse else 1.0
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    x1, x2 = _pairs(x, pairs, interleaved)
    out1, out2 = _pairs(out, pairs, interleaved)
    # out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin (sin negated for the inverse rotation)
    for target, a, b, weight in ((out1, x1, x2, -sign), (out2, x2, x1, sign)):
        if x.dtype == cos.dtype:
            torch.mul(a, cos, out=target).addcmul_(b, sin, value=weight)
        else:  # rotate at cos's precision and round once, like rotate_reference
            target.copy_(torch.mul(a, cos).addcmul_(b, sin, value=weight))
    out[..., 2 * pairs :] = x[..., 2 * pairs :]
    return out


def _angle_grads(grad: Tensor, x: Tensor, cos: Tensor, interleaved: bool, inverse: bool) -> tuple[Tensor, Tensor]:
    """d loss / d cos and d loss / d sin per row, (..., N, P) like the output: still to be summed over
    the dims the tables broadcast over."""
    pairs = cos.shape[-1]
    g1, g2 = (t.to(cos.dtype) for t in _pairs(grad, pairs, interleaved))
    x1, x2 = (t.to(cos.dtype) for t in _pairs(x, pairs, interleaved))
    grad_cos = g1 * x1 + g2 * x2
    grad_sin = g2 * x1 - g1 * x2
    return grad_cos, (-grad_sin if inverse else grad_sin)


# ---------------------------------------------------------------------------------------------
# The C++ CPU kernel: plain C ABI (no torch headers, so it builds in about a second), called via ctypes.

_CPP_SOURCE = r"""
// ndrope rotary kernels: plain C ABI, no torch headers (called through ctypes).
#include <cstdint>
#include <cstring>
#include <omp.h>

namespace {

constexpr int kMaxDims = 16;

// Storage <-> compute conversions. bfloat16 goes through its bits so that the loops vectorise.
struct bf16 { uint16_t bits; };
template <typename C> inline C load(float v) { return static_cast<C>(v); }
template <typename C> inline C load(double v) { return static_cast<C>(v); }
template <typename C> inline C load(_Float16 v) { return static_cast<C>(static_cast<float>(v)); }
template <typename C> inline C load(bf16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.bits) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return static_cast<C>(out);
}
template <typename T, typename C> inline T store(C v) { return static_cast<T>(v); }
template <> inline _Float16 store<_Float16, double>(double v) { return static_cast<_Float16>(static_cast<float>(v)); }
template <> inline bf16 store<bf16, float>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);  // to nearest even
  return bf16{v != v ? uint16_t(0x7FC0) : rounded};
}
template <> inline bf16 store<bf16, double>(double v) { return store<bf16, float>(static_cast<float>(v)); }

// An index space over some of the row dims (x.shape[:-1]) that Ops operands walk with their own
// element strides (stride 0 where an operand is broadcast). Size-1 dims are dropped and
// contiguous runs merged, so a contiguous tensor is a single dim.
template <int Ops>
struct Rows {
  int ndim = 0;
  int64_t count = 1;
  int64_t size[kMaxDims];
  int64_t stride[Ops][kMaxDims];

  // keep[d] selects the dims of this space (nullptr: all of them)
  Rows(int64_t dims, const int64_t* sizes, const int64_t* const (&strides)[Ops], const bool* keep) {
    for (int64_t d = 0; d < dims; ++d) {
      if ((keep && !keep[d]) || sizes[d] == 1) continue;
      count *= sizes[d];
      const int k = ndim;
      bool merge = k > 0;
      for (int o = 0; o < Ops && merge; ++o) merge = stride[o][k - 1] == strides[o][d] * sizes[d];
      const int at = merge ? k - 1 : k;
      size[at] = merge ? size[at] * sizes[d] : sizes[d];
      for (int o = 0; o < Ops; ++o) stride[o][at] = strides[o][d];
      ndim = at + 1;
    }
  }

  // Calls fn(offsets) for rows [begin, end), stepping the multi-index like an odometer.
  template <typename Fn>
  void walk(int64_t begin, int64_t end, const Fn& fn) const {
    int64_t index[kMaxDims];
    int64_t offset[Ops] = {};
    int64_t rest = begin;
    for (int d = ndim - 1; d >= 0; --d) {
      index[d] = rest % size[d];
      rest /= size[d];
      for (int o = 0; o < Ops; ++o) offset[o] += index[d] * stride[o][d];
    }
    for (int64_t r = begin; r < end; ++r) {
      fn(static_cast<const int64_t*>(offset));
      for (int d = ndim - 1; d >= 0; --d) {
        for (int o = 0; o < Ops; ++o) offset[o] += stride[o][d];
        if (++index[d] < size[d]) break;
        for (int o = 0; o < Ops; ++o) offset[o] -= size[d] * stride[o][d];
        index[d] = 0;
      }
    }
  }
};

// Splits [0, count) evenly over the threads, as at::parallel_for does; serial for small work.
template <typename Fn>
void parallel_rows(int64_t count, int64_t work, int threads, const Fn& fn) {
  const bool parallel = threads > 1 && count > 1 && work >= 32768;  // below that the fork costs more
#pragma omp parallel num_threads(threads) if (parallel)
  {
    const int64_t teams = omp_get_num_threads(), team = omp_get_thread_num();
    const int64_t chunk = (count + teams - 1) / teams;
    const int64_t begin = team * chunk, end = begin + chunk < count ? begin + chunk : count;
    if (begin < end) fn(begin, end);
  }
}

// Channel pairs: half layout (j, j + P), interleaved (2j, 2j + 1).
template <bool Interleaved> inline int64_t first(int64_t j, int64_t) { return Interleaved ? 2 * j : j; }
template <bool Interleaved> inline int64_t second(int64_t j, int64_t pairs) {
  return Interleaved ? 2 * j + 1 : j + pairs;
}

// One row: the first 2P channels rotated by sign * angle, the rest copied.
template <typename T, typename C, bool Interleaved>
inline void rotate_row(const T* __restrict__ x, const C* __restrict__ cos, const C* __restrict__ sin,
                       T* __restrict__ out, int64_t pairs, int64_t dim, C sign) {
#pragma omp simd
  for (int64_t j = 0; j < pairs; ++j) {
    const int64_t a = first<Interleaved>(j, pairs), b = second<Interleaved>(j, pairs);
    const C xa = load<C>(x[a]), xb = load<C>(x[b]);
    const C c = cos[j], s = sign * sin[j];
    out[a] = store<T, C>(xa * c - xb * s);
    out[b] = store<T, C>(xb * c + xa * s);
  }
  for (int64_t j = 2 * pairs; j < dim; ++j) out[j] = x[j];
}

// Backward of one row when the angles are learned: grad_x (rotation by -sign * angle, if wanted)
// and the row's contribution to d cos, d sin, accumulated into the table row's sums.
template <typename T, typename C, bool Interleaved>
inline void backward_row(const T* __restrict__ g, const T* __restrict__ x, const C* __restrict__ cos,
                         const C* __restrict__ sin, T* __restrict__ dx, C* __restrict__ dcos,
                         C* __restrict__ dsin, int64_t pairs, int64_t dim, C sign) {
#pragma omp simd
  for (int64_t j = 0; j < pairs; ++j) {
    const int64_t a = first<Interleaved>(j, pairs), b = second<Interleaved>(j, pairs);
    const C ga = load<C>(g[a]), gb = load<C>(g[b]), xa = load<C>(x[a]), xb = load<C>(x[b]);
    const C c = cos[j], s = sign * sin[j];
    if (dx) {
      dx[a] = store<T, C>(ga * c + gb * s);
      dx[b] = store<T, C>(gb * c - ga * s);
    }
    dcos[j] += ga * xa + gb * xb;
    dsin[j] += sign * (gb * xa - ga * xb);
  }
  if (dx)
    for (int64_t j = 2 * pairs; j < dim; ++j) dx[j] = g[j];
}

// The call's description, one int64 array (ctypes marshals one pointer far faster than many
// arguments): [x dtype, cos dtype, ndim, pairs, dim, interleaved, inverse, threads,
// the operands' addresses, the row sizes (x.shape[:-1]), then each operand's strides over them].
// dtype codes: 0 float32, 1 float64, 2 bfloat16, 3 float16; cos and sin are float32 or float64.
struct Call {
  int64_t ndim, pairs, dim;
  bool interleaved, inverse;
  int threads;
  const int64_t* address;
  const int64_t* sizes;
  const int64_t* strides(int op) const { return sizes + (1 + op) * ndim; }
};

Call parse(const int64_t* args, int ops) {
  const int threads = static_cast<int>(args[7]);
  return Call{args[2], args[3], args[4], args[5] != 0, args[6] != 0, threads, args + 8, args + 8 + ops};
}

// Forward (and backward with fixed angles): operands x, cos, sin, out.
template <typename T, typename C>
void rotate(const Call& call) {
  const int64_t* const strides[4] = {call.strides(0), call.strides(1), call.strides(2), call.strides(3)};
  const Rows<4> rows(call.ndim, call.sizes, strides, nullptr);
  const T* x = reinterpret_cast<const T*>(call.address[0]);
  const C* cos = reinterpret_cast<const C*>(call.address[1]);
  const C* sin = reinterpret_cast<const C*>(call.address[2]);
  T* out = reinterpret_cast<T*>(call.address[3]);
  const C sign = call.inverse ? C(-1) : C(1);
  const int64_t pairs = call.pairs, dim = call.dim;
  parallel_rows(rows.count, rows.count * dim, call.threads, [&](int64_t begin, int64_t end) {
    rows.walk(begin, end, [&](const int64_t* off) {
      if (call.interleaved)
        rotate_row<T, C, true>(x + off[0], cos + off[1], sin + off[2], out + off[3], pairs, dim, sign);
      else
        rotate_row<T, C, false>(x + off[0], cos + off[1], sin + off[2], out + off[3], pairs, dim, sign);
    });
  });
}

// Backward with learned angles: operands grad, x, cos, sin, dx (address 0: not wanted), dcos, dsin.
// dcos/dsin are the (unexpanded) tables, stride 0 on the dims they broadcast over. Threads own
// table rows and sum over the broadcast dims themselves, so no two threads write the same row.
template <typename T, typename C>
void rotate_backward(const Call& call) {
  const int64_t* const strides[7] = {call.strides(0), call.strides(1), call.strides(2), call.strides(3),
                                     call.strides(4), call.strides(5), call.strides(6)};
  bool table_dim[kMaxDims], broadcast_dim[kMaxDims];
  for (int64_t d = 0; d < call.ndim; ++d) {
    broadcast_dim[d] = strides[5][d] == 0 && strides[6][d] == 0;
    table_dim[d] = !broadcast_dim[d];
  }
  const Rows<7> outer(call.ndim, call.sizes, strides, table_dim);
  const Rows<7> inner(call.ndim, call.sizes, strides, broadcast_dim);
  const T* g = reinterpret_cast<const T*>(call.address[0]);
  const T* x = reinterpret_cast<const T*>(call.address[1]);
  const C* cos = reinterpret_cast<const C*>(call.address[2]);
  const C* sin = reinterpret_cast<const C*>(call.address[3]);
  T* dx = reinterpret_cast<T*>(call.address[4]);
  C* dcos = reinterpret_cast<C*>(call.address[5]);
  C* dsin = reinterpret_cast<C*>(call.address[6]);
  const C sign = call.inverse ? C(-1) : C(1);
  const int64_t pairs = call.pairs, dim = call.dim;
  parallel_rows(outer.count, outer.count * inner.count * dim, call.threads, [&](int64_t begin, int64_t end) {
    outer.walk(begin, end, [&](const int64_t* o) {
      C* dc = dcos + o[5];
      C* ds = dsin + o[6];
      for (int64_t j = 0; j < pairs; ++j) dc[j] = ds[j] = C(0);
      inner.walk(0, inner.count, [&](const int64_t* i) {
        const T* g_row = g + o[0] + i[0];
        const T* x_row = x + o[1] + i[1];
        T* dx_row = dx ? dx + o[4] + i[4] : nullptr;
        if (call.interleaved)
          backward_row<T, C, true>(g_row, x_row, cos + o[2], sin + o[3], dx_row, dc, ds, pairs, dim, sign);
        else
          backward_row<T, C, false>(g_row, x_row, cos + o[2], sin + o[3], dx_row, dc, ds, pairs, dim, sign);
      });
    });
  });
}

template <template <typename, typename> class Kernel>
int dispatch(const int64_t* args, int ops) {
  const Call call = parse(args, ops);
  if (call.ndim > kMaxDims) return 3;
  const int64_t x_dtype = args[0], cos_dtype = args[1];  // cos is at least as wide as x (the compute dtype)
  if (cos_dtype != 0 && cos_dtype != 1) return 2;
  const bool wide = cos_dtype == 1;
  switch (x_dtype) {
    case 0: wide ? Kernel<float, double>::run(call) : Kernel<float, float>::run(call); return 0;
    case 1: if (!wide) return 2; Kernel<double, double>::run(call); return 0;
    case 2: wide ? Kernel<bf16, double>::run(call) : Kernel<bf16, float>::run(call); return 0;
    case 3: wide ? Kernel<_Float16, double>::run(call) : Kernel<_Float16, float>::run(call); return 0;
    default: return 1;
  }
}

template <typename T, typename C> struct Forward {
  static void run(const Call& call) { rotate<T, C>(call); }
};
template <typename T, typename C> struct Backward {
  static void run(const Call& call) { rotate_backward<T, C>(call); }
};

}  // namespace

// Both return 0 on success, 1 for a bad x dtype, 2 for a bad cos dtype, 3 for too many dims.
extern "C" int ndrope_rotate(const int64_t* args) { return dispatch<Forward>(args, 4); }
extern "C" int ndrope_rotate_backward(const int64_t* args) { return dispatch<Backward>(args, 7); }
"""

# Explicit ISA flags rather than -march=native: the cached library is keyed by this capability, so a
# cache directory shared by different CPUs never runs instructions a CPU lacks.
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}

_library: ctypes.CDLL | None = None
_build_error: BaseException | None = None


def _cache_dir() -> str:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    return os.path.join(root, "ndrope")


def _build() -> ctypes.CDLL:
    """Compile the kernel once per (source, flags, compiler) into the cache dir, then load it."""
    compiler = os.environ.get("CXX", "c++")
    capability = torch.backends.cpu.get_cpu_capability()
    command = [compiler, "-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", *_ISA_FLAGS.get(capability, [])]
    digest = hashlib.sha256("\0".join([_CPP_SOURCE, *command]).encode()).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"rotary_{capability.lower()}_{digest}.so")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as scratch:
            source, library = os.path.join(scratch, "rotary.cpp"), os.path.join(scratch, "rotary.so")
            with open(source, "w") as file:
                file.write(_CPP_SOURCE)
            result = subprocess.run([*command, source, "-o", library], capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
            os.replace(library, path)  # atomic: a concurrent build never sees a partial file
    library = ctypes.CDLL(path)
    for function in (library.ndrope_rotate, library.ndrope_rotate_backward):
        function.restype = ctypes.c_int
        function.argtypes = [ctypes.POINTER(ctypes.c_int64)]
    return library


def cpp_available() -> bool:
    """Whether the C++ kernel is loaded; builds it on the first call (about a second once, then cached)."""
    global _library, _build_error
    if _library is None and _build_error is None:
        try:
            _library = _build()
        except Exception as error:  # no compiler, no OpenMP, read-only cache dir, ...
            _build_error = error
            warnings.warn(f"ndrope: C++ rotary kernel unavailable, using the torch path ({error})", RuntimeWarning)
    return _library is not None


def _call(
    function: Any, x: Tensor, cos: Tensor, interleaved: bool, inverse: bool, operands: list[Tensor | None]
) -> None:
    """Describe the call in one int64 array (see `Call` in the C++ source) and run it."""
    lead = x.dim() - 1
    header = (
        _DTYPE_CODES[x.dtype], _DTYPE_CODES[cos.dtype], lead, cos.shape[-1], x.shape[-1], interleaved, inverse,
        torch.get_num_threads(),
    )
    addresses = tuple(0 if t is None else t.data_ptr() for t in operands)
    strides = tuple(s for t in operands for s in ((0,) * lead if t is None else t.stride()[:-1]))
    values = header + addresses + tuple(x.shape[:-1]) + strides
    status = function((ctypes.c_int64 * len(values))(*values))
    if status != 0:
        shapes = ", ".join(f"{t.dtype} {tuple(t.shape)}" for t in operands if t is not None)
        raise RuntimeError(f"{function.__name__} failed with status {status} ({shapes})")


def _rotate_cpp(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool) -> Tensor:
    """Forward: cos/sin already expanded to x's rows."""
    out = torch.empty(x.shape, dtype=x.dtype)
    _call(_library.ndrope_rotate, x, cos, interleaved, inverse, [x, cos, sin, out])
    return out


def _rotate_backward_cpp(
    grad: Tensor, x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool, inverse: bool, want_grad_x: bool
) -> tuple[Tensor | None, Tensor, Tensor]:
    """grad_x (or None) and the gradients of the unexpanded cos/sin tables, summed over broadcast dims."""
    table = (*x.shape[:-1], cos.shape[-1])
    grad_x = torch.empty(x.shape, dtype=x.dtype) if want_grad_x else None
    grad_cos, grad_sin = torch.empty(cos.shape, dtype=cos.dtype), torch.empty(sin.shape, dtype=sin.dtype)
    operands = [grad, x, cos.expand(table), sin.expand(table), grad_x, grad_cos.expand(table), grad_sin.expand(table)]
    _call(_library.ndrope_rotate_backward, x, cos, interleaved, inverse, operands)
    return grad_x, grad_cos, grad_sin
