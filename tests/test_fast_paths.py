"""The fast rotation paths (`ndrope._kernels`) equal `rotate_reference`: values, gradients, memory."""

from __future__ import annotations

import warnings

import pytest
import torch

import ndrope
from ndrope import _kernels
from ndrope.functional import rotate_reference

param = pytest.mark.parametrize

FAST = ["cpp", "torch"]
LAYOUTS = ["half", "interleaved"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# One output rounding apart at most: float32 math rounded once to the storage dtype on both sides.
TOL = {
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=8e-3),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
}
B, H, N, D = 2, 3, 7, 16  # odd token count
# angle tables (..., N, P) broadcast against x (B, H, N, D)
ANGLE_SHAPES = {"shared": (N,), "per_head": (H, N), "per_batch": (B, 1, N), "one_position": (1,)}


@pytest.fixture(params=FAST)
def backend(request):
    if request.param == "cpp" and not _kernels.cpp_available():
        pytest.skip(f"C++ kernel did not build: {_kernels._build_error}")
    with _kernels.use_backend(request.param):
        yield request.param


def make_x(dtype: torch.dtype, contiguous: bool, seed: int = 0) -> torch.Tensor:
    """x (B, H, N, D); non-contiguous as timm makes it: qkv (B, N, 3, H, D) permuted and unbound."""
    g = torch.Generator().manual_seed(seed)
    if contiguous:
        return torch.randn(B, H, N, D, generator=g, dtype=torch.float64).to(dtype)
    qkv = torch.randn(B, N, 3, H, D, generator=g, dtype=torch.float64).to(dtype)
    q, _, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    return q


def make_angles(shape: str, pairs: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*ANGLE_SHAPES[shape], pairs, generator=g, dtype=torch.float64) * 20 - 10).to(dtype)


def expected(x: torch.Tensor, theta: torch.Tensor, layout: str) -> torch.Tensor:
    return rotate_reference(x, theta.cos(), theta.sin(), layout)


@param("contiguous", [True, False], ids=["contiguous", "qkv_unbind"])
@param("pairs", [D // 2, 3], ids=["full", "partial"])
@param("angle_shape", list(ANGLE_SHAPES))
@param("dtype", DTYPES, ids=str)
@param("layout", LAYOUTS)
def test_values_match_reference(backend, layout, dtype, angle_shape, pairs, contiguous):
    """Both layouts, every dtype, partial rotation, broadcast angles, transposed inputs."""
    x = make_x(dtype, contiguous)
    theta = make_angles(angle_shape, pairs, torch.float64 if dtype == torch.float64 else torch.float32)
    out = ndrope.apply_rotary(x, theta, layout=layout)
    ref = expected(x, theta, layout)
    assert out.dtype == x.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])
    torch.testing.assert_close(out[..., 2 * pairs :], x[..., 2 * pairs :], atol=0, rtol=0)


@param("pairs", [D // 2, 3], ids=["full", "partial"])
@param("angle_shape", list(ANGLE_SHAPES))
@param("dtype", DTYPES, ids=str)
@param("layout", LAYOUTS)
def test_gradients_match_reference(backend, layout, dtype, angle_shape, pairs):
    """Gradients for x and for learned angles (RoPE-Mixed), through a non-contiguous x."""
    weight = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    grads = {}
    for name in ("fast", "reference"):
        x = make_x(dtype, contiguous=False).requires_grad_()
        theta = make_angles(angle_shape, pairs, torch.float64 if dtype == torch.float64 else torch.float32)
        theta.requires_grad_()
        with _kernels.use_backend(backend if name == "fast" else "reference"):
            out = ndrope.apply_rotary(x, theta, layout=layout)
        (out.float() * weight.float()).sum().backward()
        grads[name] = (x.grad, theta.grad)
    torch.testing.assert_close(grads["fast"][0], grads["reference"][0], **TOL[dtype])
    # angle gradients are float32 (float64) sums over the broadcast dims on both sides: only the order differs
    angle_tol = TOL[torch.float64] if dtype == torch.float64 else dict(atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(grads["fast"][1], grads["reference"][1], **angle_tol)


def test_sum_backward_has_expanded_grad(backend):
    """out.sum() hands backward a grad with stride 0 on every dim."""
    x = make_x(torch.float32, contiguous=True).requires_grad_()
    theta = make_angles("shared", D // 2)
    ndrope.apply_rotary(x, theta).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    expected(x_ref, theta, "half").sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL[torch.float32])


@param("layout", LAYOUTS)
@param("pairs", [4, 3], ids=["full", "partial"])
def test_gradcheck_float64(backend, layout, pairs):
    """Analytic gradients (x and angles) against finite differences, and second derivatives."""
    x = torch.randn(2, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    theta = torch.randn(2, 5, pairs, dtype=torch.float64, requires_grad=True)

    def fn(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return ndrope.apply_rotary(x, theta, layout=layout)

    assert torch.autograd.gradcheck(fn, (x, theta))
    assert torch.autograd.gradgradcheck(fn, (x, theta))


def test_float32_x_with_float64_angles(backend):
    """The math runs at the wider of x and the angles, then rounds to x's dtype."""
    x = make_x(torch.float32, contiguous=True)
    theta = make_angles("shared", D // 2, torch.float64) * 1e3
    out = ndrope.apply_rotary(x, theta)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected(x, theta, "half"), **TOL[torch.float32])


def test_precomputed_cos_sin(backend):
    x = make_x(torch.bfloat16, contiguous=False)
    theta = make_angles("per_head", D // 2)
    out = ndrope.apply_rotary(x, ndrope.cos_sin(theta))
    torch.testing.assert_close(out, expected(x, theta, "half"), **TOL[torch.bfloat16])


@param("shape", [(0, H, N, D), (B, H, 1, D), (N, D)], ids=["empty", "one_token", "no_leading_dims"])
def test_edge_shapes(backend, shape):
    x = torch.randn(shape)
    theta = torch.randn(shape[-2], 5)
    torch.testing.assert_close(ndrope.apply_rotary(x, theta), expected(x, theta, "half"), **TOL[torch.float32])


def test_angles_with_more_leading_dims_than_x(backend):
    """x (H, N, D) against per-batch angles (B, 1, N, P): the output takes the broadcast shape."""
    x = make_x(torch.float32, contiguous=True)[0].requires_grad_()
    theta = make_angles("per_batch", D // 2).requires_grad_()
    out = ndrope.apply_rotary(x, theta)
    (out * out.detach().flip(-1)).sum().backward()
    x_ref, theta_ref = x.detach().clone().requires_grad_(), theta.detach().clone().requires_grad_()
    ref = expected(x_ref, theta_ref, "half")
    (ref * ref.detach().flip(-1)).sum().backward()
    assert out.shape == (B, H, N, D)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL[torch.float32])
    torch.testing.assert_close(theta.grad, theta_ref.grad, atol=1e-4, rtol=1e-4)


class TestMemory:
    def saved_bytes(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> int:
        """Bytes of distinct storages autograd keeps for the backward of one rotation."""
        storages = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ndrope.apply_rotary(x, cos_sin)
        return sum(storages.values())

    def test_saves_only_the_tables(self, backend):
        """Backward is the rotation by -angle: only cos/sin (N, P) are kept, no full-size temporaries."""
        x = torch.randn(4, H, 64, D, requires_grad=True)
        cos_sin = ndrope.cos_sin(torch.randn(64, D // 2))
        assert self.saved_bytes(x, cos_sin) == 2 * cos_sin[0].nbytes

    def test_learned_angles_also_keep_x(self, backend):
        """With learned angles the angle gradient needs x, which is alive anyway (an input)."""
        x = torch.randn(4, H, 64, D, requires_grad=True)
        cos_sin = tuple(t.requires_grad_() for t in ndrope.cos_sin(torch.randn(64, D // 2)))
        assert self.saved_bytes(x, cos_sin) == 2 * cos_sin[0].nbytes + x.nbytes

    def test_reference_keeps_more_for_learned_angles(self, backend):
        """The plain formula keeps float32 copies of a bfloat16 x's pairs; the fast paths keep x itself."""
        x = torch.randn(4, H, 64, D, dtype=torch.bfloat16, requires_grad=True)
        cos_sin = tuple(t.requires_grad_() for t in ndrope.cos_sin(torch.randn(64, D // 2)))
        fast = self.saved_bytes(x, cos_sin)
        with _kernels.use_backend("reference"):
            assert self.saved_bytes(x, cos_sin) >= fast + x.nbytes


class TestBackendSelection:
    def test_reference_backend_is_the_plain_formula(self):
        x, theta = make_x(torch.float32, contiguous=False), make_angles("per_head", D // 2)
        with _kernels.use_backend("reference"):
            assert _kernels.resolve_backend(x) == "reference"
            torch.testing.assert_close(ndrope.apply_rotary(x, theta), expected(x, theta, "half"), atol=0, rtol=0)

    def test_auto_uses_cpp_on_cpu_when_built(self):
        with _kernels.use_backend("auto"):
            assert _kernels.resolve_backend(torch.zeros(1, 2)) == ("cpp" if _kernels.cpp_available() else "torch")

    def test_use_backend_restores(self):
        before = _kernels.get_backend()
        with _kernels.use_backend("torch"):
            assert _kernels.get_backend() == "torch"
        assert _kernels.get_backend() == before

    def test_angles_on_another_device(self, backend):
        x, theta = make_x(torch.float32, contiguous=True), make_angles("shared", D // 2).to("meta")
        with pytest.raises(ValueError, match="angles are on meta but x is on cpu"):
            ndrope.apply_rotary(x, theta)

    def test_bad_backend_name(self):
        with pytest.raises(ValueError, match=r"backend='gpu' is not supported"):
            _kernels.set_backend("gpu")

    def test_failed_build_falls_back_with_a_warning(self, monkeypatch):
        def broken_build() -> None:
            raise RuntimeError("no compiler")

        monkeypatch.setattr(_kernels, "_build", broken_build)
        monkeypatch.setattr(_kernels, "_library", None)
        monkeypatch.setattr(_kernels, "_build_error", None)
        x, theta = make_x(torch.float32, contiguous=True), make_angles("shared", D // 2)
        with _kernels.use_backend("auto"), pytest.warns(RuntimeWarning, match="no compiler"):
            assert _kernels.resolve_backend(x) == "torch"
        with _kernels.use_backend("auto"), warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once only
            torch.testing.assert_close(ndrope.apply_rotary(x, theta), expected(x, theta, "half"), **TOL[torch.float32])
        with _kernels.use_backend("cpp"), pytest.raises(RuntimeError, match="did not build: no compiler"):
            ndrope.apply_rotary(x, theta)

    def test_torch_compile_traces_the_reference_formula(self):
        """Under torch.compile the plain formula is traced (and fused by the compiler), not the kernel."""
        x, theta = make_x(torch.float32, contiguous=False), make_angles("per_head", D // 2)

        def rotate(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
            return ndrope.apply_rotary(x, theta, layout="interleaved")

        compiled = torch.compile(rotate, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x, theta), expected(x, theta, "interleaved"), **TOL[torch.float32])

    @pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated", "ignore::torch.jit.TracerWarning")
    def test_jit_trace_records_the_reference_formula(self):
        """A traced graph (ONNX export) must hold torch ops, so tracing takes the reference path."""
        x, theta = make_x(torch.float32, contiguous=True), make_angles("shared", D // 2)
        traced = torch.jit.trace(lambda x, theta: ndrope.apply_rotary(x, theta), (x, theta))
        other = make_x(torch.float32, contiguous=True, seed=5)
        torch.testing.assert_close(traced(other, theta), expected(other, theta, "half"), **TOL[torch.float32])


def test_axial_tables_are_computed_once_and_shared():
    """The module caches (cos, sin) per grid: one (N, P) table for every layer, head and batch item."""
    rope = ndrope.RotaryEmbedding(D, n_axes=2)
    first = rope.cos_sin((3, 5))
    assert rope.cos_sin((3, 5))[0] is first[0]
    assert first[0].shape == (15, D // 2)
    calls = []
    original = rope.angles
    rope.angles = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    q, k = torch.randn(B, H, 15, D), torch.randn(B, H, 15, D)
    for _ in range(3):  # three layers
        rope(q, k, (3, 5))
    assert calls == []
