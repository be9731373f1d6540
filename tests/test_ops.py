"""The rotation ops ``ndrope::rotate`` and ``ndrope::rotate_pair`` (`ndrope._ops`): the C++ kernel and the
torch formula against an independent formula (values, gradients, saved tensors); torch.compile,
torch.export, fake tensors, torch.func and opcheck; the kernel's ABI checks and its fallback. The GPU
kernel behind the same ops is tested in tests/test_triton.py."""

from __future__ import annotations

import ctypes
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rope_reference import rotate_formula

import ndrope
from ndrope import _kernel, _ops

param = pytest.mark.parametrize

LAYOUTS = ["half", "interleaved"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# One output rounding apart at most: float32 (float64) math rounded once to the storage dtype.
TOL = {
    torch.float64: dict(atol=1e-12, rtol=1e-12),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=8e-3),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
}
B, H, N, D = 2, 3, 7, 16  # odd token count
# angle tables (..., N, P) broadcast against x (B, H, N, D)
ANGLE_SHAPES = {"shared": (N,), "per_head": (H, N), "per_batch": (B, 1, N), "one_position": (1,)}


def kernel_or_skip() -> ctypes.CDLL:
    lib = _kernel.library()
    if lib is None:
        pytest.skip(f"the C++ kernel is unavailable here: {_kernel.failure()}")
    return lib


@pytest.fixture(params=["kernel", "torch"])
def path(request, monkeypatch):
    """Which implementation the CPU op runs; ``calls`` records the kernel entry points it used."""
    calls: list[str] = []
    if request.param == "kernel":
        kernel_or_skip()
        real = _kernel.run
        monkeypatch.setattr(_kernel, "run", lambda entry, *args: calls.append(entry) or real(entry, *args))
    else:
        monkeypatch.setattr(_kernel, "library", lambda: None)  # as without a compiler

        def refuse(*args):
            raise AssertionError("the kernel ran on the torch path")

        monkeypatch.setattr(_kernel, "run", refuse)
    return SimpleNamespace(name=request.param, calls=calls)


def make_x(dtype: torch.dtype, contiguous: bool = True, seed: int = 0) -> torch.Tensor:
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


def expected(x: torch.Tensor, theta: torch.Tensor, layout: str = "half") -> torch.Tensor:
    return rotate_formula(x, theta.cos(), theta.sin(), layout)


class ApplyRotary(torch.nn.Module):
    """`ndrope.apply_rotary` as a module, for export and tracing."""

    def forward(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        return ndrope.apply_rotary(x, theta)


def table_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class TestValues:
    @param("contiguous", [True, False], ids=["contiguous", "qkv_unbind"])
    @param("pairs", [D // 2, 3], ids=["full", "partial"])
    @param("angle_shape", list(ANGLE_SHAPES))
    @param("dtype", DTYPES, ids=str)
    @param("layout", LAYOUTS)
    def test_match_the_formula(self, path, layout, dtype, angle_shape, pairs, contiguous):
        """Both layouts, every dtype, partial rotation, broadcast per-head / per-batch tables, timm's views."""
        x = make_x(dtype, contiguous)
        theta = make_angles(angle_shape, pairs, table_dtype(dtype))
        out = ndrope.apply_rotary(x, theta, layout=layout)
        ref = expected(x, theta, layout)
        assert out.dtype == x.dtype and out.shape == ref.shape
        torch.testing.assert_close(out, ref, **TOL[dtype])
        torch.testing.assert_close(out[..., 2 * pairs :], x.expand_as(out)[..., 2 * pairs :], atol=0, rtol=0)
        assert path.calls == (["ndrope_rotate"] if path.name == "kernel" else [])

    @param("inverse", [False, True])
    @param("dtype", DTYPES, ids=str)
    @param("layout", LAYOUTS)
    def test_kernel_equals_the_torch_formula_of_the_op(self, layout, dtype, inverse):
        """The registered CPU kernel and `_ops._rotate_torch` on the same prepared operands."""
        kernel_or_skip()
        x = make_x(dtype, contiguous=False).contiguous()
        cos, sin = ndrope.cos_sin(make_angles("per_head", 5, table_dtype(dtype)))
        interleaved = layout == "interleaved"
        out = torch.ops.ndrope.rotate(x, cos, sin, interleaved, inverse)
        torch.testing.assert_close(out, _ops._rotate_torch(x, cos, sin, interleaved, inverse), **TOL[dtype])
        back = torch.ops.ndrope.rotate(out, cos, sin, interleaved, not inverse)
        torch.testing.assert_close(back, x, **{k: 4 * v for k, v in TOL[dtype].items()})

    @param("table", ["shared", "per_batch"])
    @param("heads", [1, 4, 5, 9], ids=lambda h: f"H{h}")
    @param("pairs", [16, 32, 64, 24], ids=lambda p: f"P{p}")
    @param("dtype", [torch.float32, torch.bfloat16], ids=str)
    @param("layout", LAYOUTS)
    def test_kernel_groups_rows_that_share_a_table_row(self, layout, dtype, pairs, heads, table):
        """The kernel applies each table row to up to 4 rows of the dims the table broadcasts over, with
        the pair loop unrolled for P = 16, 32, 64: whole groups, a remainder, single rows, partial
        rotation, and work split over threads in the middle of a group."""
        kernel_or_skip()
        g = torch.Generator().manual_seed(pairs + heads)
        x = torch.randn(3, heads, 401, 2 * pairs + 2, generator=g).to(dtype)  # 2 channels pass through
        theta = torch.rand(*((3, 1) if table == "per_batch" else ()), 401, pairs, generator=g) * 20 - 10
        cos, sin = ndrope.cos_sin(theta)
        interleaved = layout == "interleaved"
        out = torch.ops.ndrope.rotate(x, cos, sin, interleaved, False)
        torch.testing.assert_close(out, _ops._rotate_torch(x, cos, sin, interleaved, False), **TOL[dtype])
        torch.testing.assert_close(out, expected(x, theta, layout), **TOL[dtype])
        assert torch.equal(out[..., 2 * pairs :], x[..., 2 * pairs :])

    @param("inverse", [False, True])
    @param("head_dim", [16, 32, 64, 24, 34], ids=lambda d: f"D{d}")
    @param("dtype", [torch.float32, torch.bfloat16], ids=str)
    @param("layout", LAYOUTS)
    def test_streamed_rows_match_the_formula(self, monkeypatch, layout, dtype, head_dim, inverse):
        """Outputs larger than the last-level cache are written with non-temporal stores, rows of whole
        64-byte lines only (D = 16, 32, 64 here; 24 and 34 take the plain stores). A 1-byte 'cache'
        streams every call."""
        kernel_or_skip()
        monkeypatch.setattr(_kernel, "last_level_cache_bytes", lambda: 1)
        g = torch.Generator().manual_seed(head_dim)
        x = torch.randn(3, 5, 301, head_dim, generator=g).to(dtype)
        cos, sin = ndrope.cos_sin(torch.rand(301, head_dim // 2 - 1, generator=g) * 20 - 10)  # 2 channels pass
        interleaved = layout == "interleaved"
        out = torch.ops.ndrope.rotate(x, cos, sin, interleaved, inverse)
        torch.testing.assert_close(out, _ops._rotate_torch(x, cos, sin, interleaved, inverse), **TOL[dtype])

    def test_the_last_level_cache_is_read_from_sys(self):
        size = _kernel.last_level_cache_bytes()
        assert size >= 0
        if Path("/sys/devices/system/cpu/cpu0/cache/index0/size").exists():
            assert size >= 256 * 1024  # at least an L2's worth on any machine with a cache hierarchy

    def test_strided_last_dim(self, path):
        x = make_x(torch.float32).transpose(-1, -2).contiguous().transpose(-1, -2)  # stride(-1) == N
        assert x.stride(-1) != 1
        theta = make_angles("shared", D // 2)
        torch.testing.assert_close(ndrope.apply_rotary(x, theta), expected(x, theta), **TOL[torch.float32])

    def test_float32_x_with_float64_angles(self, path):
        """The math runs at the wider of x and the angles, then rounds to x's dtype."""
        x = make_x(torch.float32)
        theta = make_angles("shared", D // 2, torch.float64) * 1e3
        out = ndrope.apply_rotary(x, theta)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, expected(x, theta), **TOL[torch.float32])

    def test_precomputed_cos_sin(self, path):
        x = make_x(torch.bfloat16, contiguous=False)
        theta = make_angles("per_head", D // 2)
        out = ndrope.apply_rotary(x, ndrope.cos_sin(theta))
        torch.testing.assert_close(out, expected(x, theta), **TOL[torch.bfloat16])

    @param("shape", [(0, H, N, D), (B, H, 1, D), (N, D)], ids=["empty", "one_token", "no_leading_dims"])
    def test_edge_shapes(self, path, shape):
        x = torch.randn(shape)
        theta = torch.randn(shape[-2], 5)
        torch.testing.assert_close(ndrope.apply_rotary(x, theta), expected(x, theta), **TOL[torch.float32])

    @param("rank", [17, 18, 19])
    def test_high_ranks(self, path, rank):
        """16 row dims go through the kernel; more fall back to the formula, with the same result."""
        x = torch.randn(*(1,) * (rank - 3), 2, 3, 8)
        theta = torch.randn(3, 4)
        torch.testing.assert_close(ndrope.apply_rotary(x, theta), expected(x, theta), **TOL[torch.float32])
        if path.name == "kernel":
            assert path.calls == (["ndrope_rotate"] if rank - 1 <= _kernel.MAX_ROW_DIMS else [])

    @param("angle_shape", ["shared", "per_head"])
    def test_large_inputs_take_the_threaded_path(self, path, angle_shape):
        """Above the kernel's serial threshold the rows are split over threads: forward and the
        learned-angle backward (threads own table rows and sum over the broadcast dims)."""
        g = torch.Generator().manual_seed(9)
        x = torch.randn(2, H, 512, 32, generator=g).requires_grad_()
        theta = torch.randn(*(() if angle_shape == "shared" else (H,)), 512, 16, generator=g).requires_grad_()
        weight = torch.randn(2, H, 512, 32, generator=g)
        out = ndrope.apply_rotary(x, theta)
        (out * weight).sum().backward()
        x_ref, theta_ref = x.detach().clone().requires_grad_(), theta.detach().clone().requires_grad_()
        ref = expected(x_ref, theta_ref)
        (ref * weight).sum().backward()
        torch.testing.assert_close(out, ref, **TOL[torch.float32])
        torch.testing.assert_close(x.grad, x_ref.grad, **TOL[torch.float32])
        torch.testing.assert_close(theta.grad, theta_ref.grad, atol=1e-4, rtol=1e-4)

    def test_angles_with_more_leading_dims_than_x(self, path):
        """x (H, N, D) against per-batch angles (B, 1, N, P): the output takes the broadcast shape."""
        x = make_x(torch.float32)[0].requires_grad_()
        theta = make_angles("per_batch", D // 2).requires_grad_()
        out = ndrope.apply_rotary(x, theta)
        (out * out.detach().flip(-1)).sum().backward()
        x_ref, theta_ref = x.detach().clone().requires_grad_(), theta.detach().clone().requires_grad_()
        ref = expected(x_ref, theta_ref)
        (ref * ref.detach().flip(-1)).sum().backward()
        assert out.shape == (B, H, N, D)
        torch.testing.assert_close(out, ref, **TOL[torch.float32])
        torch.testing.assert_close(x.grad, x_ref.grad, **TOL[torch.float32])
        torch.testing.assert_close(theta.grad, theta_ref.grad, atol=1e-4, rtol=1e-4)


class TestAutograd:
    @param("pairs", [D // 2, 3], ids=["full", "partial"])
    @param("angle_shape", list(ANGLE_SHAPES))
    @param("dtype", DTYPES, ids=str)
    @param("layout", LAYOUTS)
    def test_gradients_match_the_formula(self, path, layout, dtype, angle_shape, pairs):
        """Gradients for x and for learned angles (RoPE-Mixed), through a non-contiguous x."""
        weight = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
        grads = {}
        for name in ("op", "formula"):
            x = make_x(dtype, contiguous=False).requires_grad_()
            theta = make_angles(angle_shape, pairs, table_dtype(dtype)).requires_grad_()
            out = ndrope.apply_rotary(x, theta, layout=layout) if name == "op" else expected(x, theta, layout)
            (out.float() * weight.float()).sum().backward()
            grads[name] = (x.grad, theta.grad)
        torch.testing.assert_close(grads["op"][0], grads["formula"][0], **TOL[dtype])
        # angle gradients are float32 (float64) sums over the broadcast dims on both sides: only the order differs
        angle_tol = TOL[torch.float64] if dtype == torch.float64 else dict(atol=5e-5, rtol=2e-5)
        torch.testing.assert_close(grads["op"][1], grads["formula"][1], **angle_tol)
        if path.name == "kernel":
            assert path.calls[0] == "ndrope_rotate" and "ndrope_rotate_backward" in path.calls

    def test_sum_backward_has_expanded_grad(self, path):
        """out.sum() hands backward a grad with stride 0 on every dim."""
        x = make_x(torch.float32).requires_grad_()
        theta = make_angles("shared", D // 2)
        ndrope.apply_rotary(x, theta).sum().backward()
        x_ref = x.detach().clone().requires_grad_()
        expected(x_ref, theta).sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, **TOL[torch.float32])

    @param("layout", LAYOUTS)
    @param("pairs", [3, 2], ids=["full", "partial"])
    def test_gradcheck_float64(self, path, layout, pairs):
        """Analytic gradients (x and learned angles, broadcast over heads) against finite differences,
        and second derivatives."""
        x = torch.randn(1, 2, 3, 6, dtype=torch.float64, requires_grad=True)
        theta = torch.randn(1, 3, pairs, dtype=torch.float64, requires_grad=True)
        fixed = theta.detach()

        def learned(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
            return ndrope.apply_rotary(x, theta, layout=layout)

        assert torch.autograd.gradcheck(learned, (x, theta))
        assert torch.autograd.gradgradcheck(learned, (x, theta))
        assert torch.autograd.gradcheck(lambda x: ndrope.apply_rotary(x, fixed, layout=layout), (x,))
        assert torch.autograd.gradgradcheck(lambda x: ndrope.apply_rotary(x, fixed, layout=layout), (x,))

    @staticmethod
    def saved(x: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
        """The tensors autograd keeps for the backward of one rotation."""
        kept: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            ndrope.apply_rotary(x, rotation)
        return kept

    @param("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_fixed_angles_save_only_cos_and_sin(self, path, dtype):
        """Backward is the rotation by -angle: only the (N, P) tables are kept, no full-size temporaries."""
        x = torch.randn(4, H, 64, D, dtype=dtype, requires_grad=True)
        cos, sin = ndrope.cos_sin(torch.randn(64, D // 2))
        kept = self.saved(x, (cos, sin))
        assert len(kept) == 2 and {t.data_ptr() for t in kept} == {cos.data_ptr(), sin.data_ptr()}

    @param("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_learned_angles_also_keep_x_itself(self, path, dtype):
        """The angle gradient needs x, which is alive anyway (an input): no float32 copy of a bf16 x."""
        x = torch.randn(4, H, 64, D, dtype=dtype, requires_grad=True)
        cos, sin = (t.requires_grad_() for t in ndrope.cos_sin(torch.randn(64, D // 2)))
        kept = self.saved(x, (cos, sin))
        assert len(kept) == 3
        assert {t.data_ptr() for t in kept} == {cos.data_ptr(), sin.data_ptr(), x.data_ptr()}
        assert sum(t.numel() for t in kept) == 2 * cos.numel() + x.numel()


class TestTransforms:
    """One registered op: torch.compile, torch.export, fake tensors and torch.func see a single node."""

    def test_compile_fullgraph_equals_eager(self):
        torch._dynamo.reset()
        x, theta = make_x(torch.float32, contiguous=False), make_angles("per_head", D // 2)

        def rotate(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
            return ndrope.apply_rotary(x, theta, layout="interleaved")

        compiled = torch.compile(rotate, backend="aot_eager", fullgraph=True)
        x1, t1 = x.clone().requires_grad_(), theta.clone().requires_grad_()
        x2, t2 = x.clone().requires_grad_(), theta.clone().requires_grad_()
        out = compiled(x1, t1)
        torch.testing.assert_close(out, rotate(x2, t2), atol=1e-6, rtol=1e-6)
        out.square().sum().backward()
        rotate(x2, t2).square().sum().backward()
        torch.testing.assert_close((x1.grad, t1.grad), (x2.grad, t2.grad), atol=1e-5, rtol=1e-5)

    @param("pair", [False, True], ids=["apply_rotary", "apply_rotary_pair"])
    def test_compiled_rotation_choice_is_guarded(self, pair):
        """set_compiled_rotation("formula") hands Dynamo the formula (no op left for Inductor to stop at);
        a compiled function recompiles when the choice changes, and export keeps the op either way."""
        torch._dynamo.reset()
        graphs = []

        def backend(graph, inputs):
            graphs.append({str(node.target) for node in graph.graph.nodes if node.op == "call_function"})
            return graph

        def rotate(q, k, theta):
            if pair:
                return ndrope.apply_rotary_pair(q, k, theta, layout="interleaved")
            return ndrope.apply_rotary(q, theta, layout="interleaved"), k

        q, k, theta = make_x(torch.bfloat16, contiguous=False), make_x(torch.bfloat16, seed=2), make_angles("per_head", 5)
        compiled = torch.compile(rotate, backend=backend, fullgraph=True)
        eager = rotate(q, k, theta)
        try:
            for choice in ("kernel", "formula", "kernel"):
                ndrope.set_compiled_rotation(choice)
                torch.testing.assert_close(compiled(q, k, theta), eager, **TOL[torch.bfloat16])
                exported = torch.export.export(ApplyRotary(), (q.float(), theta))
                assert [str(n.target) for n in exported.graph.nodes].count("ndrope.rotate.default") == 1
        finally:
            ndrope.set_compiled_rotation("kernel")
        op = "ndrope.rotate_pair.default" if pair else "ndrope.rotate.default"
        assert len(graphs) == 2  # kernel, formula; the second "kernel" call reuses the first graph
        assert any(op in str(t) for t in graphs[0]) and not any("ndrope" in str(t) for t in graphs[1])

    def test_compiled_rotation_choice_is_checked(self):
        with pytest.raises(ValueError, match=r"choice='fused' is not supported; choose one of \['kernel', 'formula'\]"):
            ndrope.set_compiled_rotation("fused")

    def test_export_holds_one_rotate_node(self):
        x, theta = make_x(torch.float32), make_angles("per_head", D // 2)
        exported = torch.export.export(ApplyRotary(), (x, theta))
        targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
        assert targets.count("ndrope.rotate.default") == 1, targets
        other_x, other_theta = make_x(torch.float32, seed=5), make_angles("per_head", D // 2, seed=6)
        out = exported.module()(other_x, other_theta)
        torch.testing.assert_close(out, ApplyRotary()(other_x, other_theta), atol=0, rtol=0)
        torch.testing.assert_close(out, expected(other_x, other_theta), **TOL[torch.float32])

    def test_fake_tensors_give_the_broadcast_shape(self):
        from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

        with FakeTensorMode():
            out = ndrope.apply_rotary(torch.empty(H, N, D, dtype=torch.bfloat16), torch.empty(B, 1, N, 5))
        assert isinstance(out, FakeTensor) and out.shape == (B, H, N, D) and out.dtype == torch.bfloat16

    def test_meta_tensors(self):
        out = ndrope.apply_rotary(torch.empty(B, H, N, D, device="meta"), torch.empty(N, 5, device="meta"))
        assert out.device.type == "meta" and out.shape == (B, H, N, D)

    def test_func_grad_matches_autograd(self):
        x, theta = make_x(torch.float32), make_angles("per_head", D // 2)
        grad_x, grad_theta = torch.func.grad(lambda x, t: ndrope.apply_rotary(x, t).square().mul(x).sum(), argnums=(0, 1))(x, theta)
        x_ref, theta_ref = x.clone().requires_grad_(), theta.clone().requires_grad_()
        ndrope.apply_rotary(x_ref, theta_ref).square().mul(x_ref).sum().backward()
        torch.testing.assert_close((grad_x, grad_theta), (x_ref.grad, theta_ref.grad), atol=1e-5, rtol=1e-5)

    def test_jacrev_matches_the_formula(self):
        x, theta = torch.randn(2, 3, 6, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
        ours = torch.func.jacrev(lambda x, t: ndrope.apply_rotary(x, t), argnums=(0, 1))(x, theta)
        reference = torch.func.jacrev(expected, argnums=(0, 1))(x, theta)
        torch.testing.assert_close(ours, reference, atol=1e-12, rtol=1e-12)

    @param("in_dims", [(0, None), (None, 0), (0, 0), (1, 0)], ids=["x", "angles", "both", "x_dim1"])
    def test_vmap_matches_a_loop(self, in_dims):
        g = torch.Generator().manual_seed(3)
        x = torch.randn(4, H, N, D, generator=g)
        theta = torch.randn(4, N, D // 2, generator=g)
        xs = x if in_dims[0] != 1 else x.movedim(0, 1)
        args = (xs if in_dims[0] is not None else x[0], theta if in_dims[1] is not None else theta[0])
        out = torch.func.vmap(lambda x, t: ndrope.apply_rotary(x, t, layout="interleaved"), in_dims=in_dims)(*args)
        loop = torch.stack(
            [
                ndrope.apply_rotary(x[i] if in_dims[0] is not None else x[0], theta[i] if in_dims[1] is not None else theta[0], layout="interleaved")
                for i in range(4)
            ]
        )
        torch.testing.assert_close(out, loop, atol=1e-6, rtol=1e-6)

    @pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")  # opcheck's own probing
    @param(
        "case",
        ["float32", "bfloat16_interleaved", "per_head_broadcast", "per_batch_inverse", "learned", "float64"],
    )
    def test_opcheck(self, case):
        g = torch.Generator().manual_seed(4)
        x = torch.randn(B, H, N, D, generator=g)
        cos, sin = ndrope.cos_sin(torch.randn(N, D // 2, generator=g))
        interleaved = inverse = False
        if case == "bfloat16_interleaved":
            x, interleaved = x.bfloat16(), True
        elif case == "per_head_broadcast":
            cos, sin = ndrope.cos_sin(torch.randn(H, N, 3, generator=g))
        elif case == "per_batch_inverse":
            cos, sin = ndrope.cos_sin(torch.randn(B, 1, N, D // 2, generator=g))
            inverse = True
        elif case == "learned":
            x = x.requires_grad_()
            cos, sin = cos.requires_grad_(), sin.requires_grad_()
        elif case == "float64":
            x, cos, sin = x.double().requires_grad_(), cos.double(), sin.double()
        torch.library.opcheck(torch.ops.ndrope.rotate.default, (x, cos, sin, interleaved, inverse))

    def test_opcheck_backward_op(self):
        g = torch.Generator().manual_seed(5)
        grad, x = torch.randn(B, H, N, D, generator=g), torch.randn(B, H, N, D, generator=g)
        cos, sin = ndrope.cos_sin(torch.randn(H, N, D // 2, generator=g))
        table = (B, H, N, D // 2)
        args = (grad, x, cos.expand(table), sin.expand(table), False, False)
        torch.library.opcheck(torch.ops.ndrope.rotate_backward.default, args, test_utils=("test_schema", "test_faketensor"))


class TestKernelABI:
    def test_abi_disagreement_raises(self, monkeypatch):
        lib = kernel_or_skip()
        _kernel.check_abi(lib)  # agrees as built
        monkeypatch.setattr(_kernel, "ABI_VERSION", _kernel.ABI_VERSION + 1)
        with pytest.raises(RuntimeError, match="ABI"):
            _kernel.check_abi(lib)
        with pytest.raises(RuntimeError, match="ABI"):  # loading checks it too (the cached build is reused)
            _kernel.load()

    def test_layout_disagreement_raises(self, monkeypatch):
        lib = kernel_or_skip()
        real = _kernel.expected_abi()
        monkeypatch.setattr(_kernel, "expected_abi", lambda: (*real[:-1], real[-1] + 8))  # a field moved
        with pytest.raises(RuntimeError, match=r"the rotary library's ABI .* differs"):
            _kernel.check_abi(lib)

    @staticmethod
    def call(x: torch.Tensor, cos: torch.Tensor, out: torch.Tensor, null_operand: int | None = None, **fields) -> tuple[int, list]:
        """Call ndrope_rotate directly with a hand-made RotaryCall: x, cos, sin (= cos), out of shape (N, D)."""
        lib = kernel_or_skip()
        call = _kernel._RotaryCall()
        call.abi_version, call.x_dtype, call.table_dtype = _kernel.ABI_VERSION, 0, 0
        call.threads, call.ndim, call.pairs, call.dim = 1, 1, cos.shape[-1], x.shape[-1]
        sizes = (ctypes.c_int64 * 1)(x.shape[0])
        call.sizes = ctypes.addressof(sizes)
        keep = [sizes]  # alive until the call returns
        for index, tensor in enumerate((x, cos, cos, out)):
            strides = (ctypes.c_int64 * 1)(tensor.stride(0))
            keep.append(strides)
            call.operands[index].data = tensor.data_ptr()
            call.operands[index].strides = ctypes.addressof(strides)
        call.n_operands = 4
        for name, value in fields.items():
            setattr(call, name, value)
        if null_operand is not None:
            call.operands[null_operand].data = None
        return lib.ndrope_rotate(ctypes.byref(call)), keep

    @param(
        "fields, status",
        [
            ({}, 0),
            (dict(abi_version=_kernel.ABI_VERSION + 1), 4),
            (dict(n_operands=3), 5),
            (dict(n_operands=7), 5),
            (dict(ndim=17), 3),
            (dict(ndim=-1), 3),
            (dict(pairs=9), 6),  # 2P > D
            (dict(x_dtype=7), 1),
            (dict(table_dtype=5), 2),
            (dict(x_dtype=1, table_dtype=0), 2),  # float64 x needs float64 tables
        ],
        ids=["valid", "abi_version", "too_few_operands", "too_many_operands", "too_many_dims", "negative_dims", "pairs", "x_dtype", "table_dtype", "narrow_table"],
    )
    def test_bad_calls_return_a_status_and_write_nothing(self, fields, status):
        x, cos = torch.randn(5, 8), torch.randn(5, 4)
        out = torch.full((5, 8), 7.0)
        code, _ = self.call(x, cos, out, **fields)
        assert code == status
        if status:
            assert (out == 7.0).all()
        else:
            torch.testing.assert_close(out, rotate_formula(x, cos, cos, "half"), atol=1e-5, rtol=1e-5)

    @param("operand", [0, 1, 2, 3])
    def test_a_null_operand_is_refused(self, operand):
        """The forward has no optional operand: a null x, cos, sin or out is a status, not a crash."""
        x, cos = torch.randn(5, 8), torch.randn(5, 4)
        out = torch.full((5, 8), 7.0)
        code, _ = self.call(x, cos, out, null_operand=operand)
        assert code == 5
        assert (out == 7.0).all()

    def test_run_raises_on_a_refused_call(self):
        kernel_or_skip()
        x, cos = torch.randn(5, 8), torch.randn(5, 4)
        with pytest.raises(RuntimeError, match="ndrope_rotate refused the call: wrong operands"):
            _kernel.run("ndrope_rotate", x, torch.float32, False, False, [x, cos, cos])

    def test_call_templates_are_per_geometry_and_evicted(self, monkeypatch):
        """`run` reuses a filled-in call per geometry (shape, strides, dtypes); a full cache is cleared,
        and every geometry still gets its own sizes and strides."""
        kernel_or_skip()
        monkeypatch.setattr(_kernel, "_TEMPLATES", {})
        monkeypatch.setattr(_kernel, "_MAX_TEMPLATES", 2)
        shapes = [(2, 3, 5, 8), (3, 5, 8), (4, 1, 5, 8), (2, 3, 5, 8)]  # the last one repeats the first
        for _ in range(2):
            for shape in shapes:
                x = torch.randn(shape)
                theta = torch.randn(5, 3)
                torch.testing.assert_close(ndrope.apply_rotary(x, theta), expected(x, theta), **TOL[torch.float32])
        assert 1 <= len(_kernel._TEMPLATES) <= 2

    def test_threads_rotating_at_once_get_their_own_results(self):
        """Python threads calling the kernel concurrently, with the same and different geometries."""
        kernel_or_skip()
        inputs = [(torch.randn(2, 3, 7 + i % 3, 16), torch.randn(7 + i % 3, 8)) for i in range(8)]
        with ThreadPoolExecutor(4) as pool:
            for _ in range(5):
                outs = list(pool.map(lambda pair: ndrope.apply_rotary(*pair), inputs))
                for (x, theta), out in zip(inputs, outs):
                    torch.testing.assert_close(out, expected(x, theta), **TOL[torch.float32])

    def test_an_operand_with_more_row_dims_than_x_is_refused(self):
        kernel_or_skip()
        x, cos = torch.randn(5, 8), torch.randn(2, 5, 4)
        with pytest.raises(ValueError, match=r"more row dims than x's 1"):
            _kernel.run("ndrope_rotate", x, torch.float32, False, False, [x, cos, cos, torch.empty_like(x)])

    def test_unavailable_kernel_falls_back_with_one_warning(self, monkeypatch):
        def broken_load() -> None:
            raise RuntimeError("no compiler")

        monkeypatch.setattr(_kernel, "load", broken_load)
        monkeypatch.setattr(_kernel, "_library", None)
        monkeypatch.setattr(_kernel, "_failure", None)
        x, theta = make_x(torch.float32), make_angles("shared", D // 2)
        with pytest.warns(RuntimeWarning, match="kernel is unavailable.*no compiler"):
            out = ndrope.apply_rotary(x, theta)
        torch.testing.assert_close(out, expected(x, theta), **TOL[torch.float32])
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once only
            torch.testing.assert_close(ndrope.apply_rotary(x, theta), expected(x, theta), **TOL[torch.float32])
        assert _kernel.library() is None and "no compiler" in str(_kernel.failure())


class TestPair:
    """``ndrope::rotate_pair``: q and k by the same rotation in one call, as two `apply_rotary` calls would."""

    @staticmethod
    def make_qk(dtype: torch.dtype, kv_heads: int = H) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(11)
        q = make_x(dtype, contiguous=False)
        k = torch.randn(B, kv_heads, N, D, generator=g, dtype=torch.float64).to(dtype)
        return q, k

    @param("kv_heads", [H, 1], ids=["self_attention", "grouped_query"])
    @param("learned", [False, True], ids=["fixed", "learned"])
    @param("dtype", DTYPES, ids=str)
    @param("layout", LAYOUTS)
    def test_values_and_gradients_equal_two_rotations(self, path, layout, dtype, learned, kv_heads):
        q, k = self.make_qk(dtype, kv_heads)
        theta = make_angles("shared", 5, table_dtype(dtype))
        weight = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
        results = {}
        for name in ("pair", "single"):
            q_in, k_in = q.clone().requires_grad_(), k.clone().requires_grad_()
            angles = theta.clone().requires_grad_(learned)
            if name == "pair":
                out_q, out_k = ndrope.apply_rotary_pair(q_in, k_in, angles, layout=layout)
            else:
                out_q, out_k = (ndrope.apply_rotary(t, angles, layout=layout) for t in (q_in, k_in))
            (out_q.double() * weight).sum().add((out_k.double() * weight[:, :kv_heads]).sum()).backward()
            results[name] = (out_q, out_k, q_in.grad, k_in.grad, angles.grad)
        for got, want in zip(results["pair"][:4], results["single"][:4]):  # the same kernels on the same rows
            torch.testing.assert_close(got, want, atol=0, rtol=0)
        if learned:  # the two tables' gradients are added in another order
            torch.testing.assert_close(results["pair"][4], results["single"][4], atol=1e-5, rtol=1e-5)
        else:
            assert results["pair"][4] is None
        torch.testing.assert_close(results["pair"][0], expected(q, theta, layout), **TOL[dtype])
        torch.testing.assert_close(results["pair"][1], expected(k, theta, layout), **TOL[dtype])

    def test_the_module_rotates_q_and_k_in_one_call(self, monkeypatch):
        rope = ndrope.RotaryEmbedding(D, n_axes=1)
        calls = []
        real = _ops.rotate_pair
        monkeypatch.setattr(_ops, "rotate_pair", lambda *args: calls.append(1) or real(*args))
        q, k = self.make_qk(torch.float32)
        with torch.no_grad():
            out_q, out_k = rope(q, k, (N,))
        assert calls == [1]
        theta = ndrope.angles(ndrope.grid((N,)), rope.freqs)
        torch.testing.assert_close(out_q, expected(q, theta), **TOL[torch.float32])

    def test_mismatched_inputs_name_q_or_k(self):
        q, k = self.make_qk(torch.float32)
        theta = make_angles("shared", 5)
        with pytest.raises(ValueError, match=r"the rotation is for 7 tokens but k has N=6 tokens"):
            ndrope.apply_rotary_pair(q, k[..., :6, :], theta)
        with pytest.raises(ValueError, match=r"k is on meta but q is on cpu"):
            ndrope.apply_rotary_pair(q, k.to("meta"), theta)

    def test_compile_fullgraph_and_export(self):
        torch._dynamo.reset()
        q, k = self.make_qk(torch.float32)
        theta = make_angles("per_head", 5)

        def rotate(q, k, theta):
            return ndrope.apply_rotary_pair(q, k, theta, layout="interleaved")

        compiled = torch.compile(rotate, backend="aot_eager", fullgraph=True)
        q1, k1, t1 = (t.clone().requires_grad_() for t in (q, k, theta))
        q2, k2, t2 = (t.clone().requires_grad_() for t in (q, k, theta))
        out = compiled(q1, k1, t1)
        torch.testing.assert_close(out, rotate(q2, k2, t2), atol=1e-6, rtol=1e-6)
        sum(o.square().sum() for o in out).backward()
        sum(o.square().sum() for o in rotate(q2, k2, t2)).backward()
        torch.testing.assert_close((q1.grad, k1.grad, t1.grad), (q2.grad, k2.grad, t2.grad), atol=1e-5, rtol=1e-5)

        class Pair(torch.nn.Module):
            def forward(self, q, k, theta):
                return rotate(q, k, theta)

        exported = torch.export.export(Pair(), (q, k, theta))
        targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
        assert targets.count("ndrope.rotate_pair.default") == 1, targets

    def test_func_grad_and_vmap(self):
        q, k = self.make_qk(torch.float64)
        theta = make_angles("shared", 5, torch.float64)

        def loss(q, k, theta):
            out_q, out_k = ndrope.apply_rotary_pair(q, k, theta)
            return (out_q * out_k).sum()

        ours = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, theta)
        reference = torch.func.grad(lambda q, k, t: (expected(q, t) * expected(k, t)).sum(), argnums=(0, 1, 2))(q, k, theta)
        torch.testing.assert_close(ours, reference, atol=1e-10, rtol=1e-10)
        thetas = torch.stack([theta, 2 * theta])
        out_q, out_k = torch.func.vmap(lambda t: ndrope.apply_rotary_pair(q, k, t), in_dims=0)(thetas)
        for i in range(2):
            torch.testing.assert_close(out_q[i], expected(q, thetas[i]), atol=1e-12, rtol=1e-12)
            torch.testing.assert_close(out_k[i], expected(k, thetas[i]), atol=1e-12, rtol=1e-12)

    @pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")  # opcheck's own probing
    @param("case", ["float32", "bfloat16_grouped_query", "learned", "float64"])
    def test_opcheck(self, case):
        g = torch.Generator().manual_seed(6)
        q, k = torch.randn(B, H, N, D, generator=g), torch.randn(B, H, N, D, generator=g)
        cos, sin = ndrope.cos_sin(torch.randn(N, D // 2, generator=g))
        if case == "bfloat16_grouped_query":
            q, k = q.bfloat16(), k[:, :1].bfloat16()
        elif case == "learned":
            q, k = q.requires_grad_(), k.requires_grad_()
            cos, sin = cos.requires_grad_(), sin.requires_grad_()
        elif case == "float64":
            q, k, cos, sin = q.double().requires_grad_(), k.double(), cos.double(), sin.double()
        torch.library.opcheck(torch.ops.ndrope.rotate_pair.default, (q, k, cos, sin, case == "learned", False))


@param("op", ["rotate", "rotate_backward"])
def test_the_ops_take_any_stride_on_the_last_dim(path, op):
    """Called directly, the ops get x and tables that are not unit-stride on the last dim: the CPU
    kernel (which steps through channels one by one) must not run on them."""
    x = make_x(torch.float32).transpose(-1, -2).contiguous().transpose(-1, -2)
    theta = make_angles("per_head", D // 2)
    cos, sin = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in ndrope.cos_sin(theta))
    assert x.stride(-1) != 1 and cos.stride(-1) != 1
    if op == "rotate":
        torch.testing.assert_close(torch.ops.ndrope.rotate(x, cos, sin, False, False), expected(x, theta), **TOL[torch.float32])
    else:
        grad = make_x(torch.float32, seed=3)
        grad_x, grad_cos, _ = torch.ops.ndrope.rotate_backward(grad, x, cos, sin, False, False)
        reference = _ops._rotate_backward_any(grad, x.contiguous(), cos.contiguous(), sin.contiguous(), False, False)
        torch.testing.assert_close((grad_x, grad_cos), reference[:2], atol=1e-5, rtol=1e-5)
    assert path.calls == []


@pytest.mark.filterwarnings("ignore:`torch.jit.trace", "ignore::torch.jit.TracerWarning")
def test_jit_trace_records_the_op_and_saves(tmp_path):
    """A traced module holds the registered op (not a Python call), so torch.jit.save works."""
    x, theta = make_x(torch.float32), make_angles("shared", D // 2)
    traced = torch.jit.trace(ApplyRotary(), (x, theta))
    assert "ndrope::rotate" in str(traced.graph)
    other = make_x(torch.float32, seed=5)
    torch.testing.assert_close(traced(other, theta), expected(other, theta), **TOL[torch.float32])
    torch.jit.save(traced, tmp_path / "rotate.pt")
    loaded = torch.jit.load(tmp_path / "rotate.pt")
    torch.testing.assert_close(loaded(other, theta), expected(other, theta), **TOL[torch.float32])


def test_axial_tables_are_computed_once_and_shared(monkeypatch):
    """At the reference grid the module hands out its stored table: no angles computed per layer."""
    rope = ndrope.RotaryEmbedding(D, n_axes=2, reference_shape=(3, 5))
    calls = []
    real = ndrope.functional._phase  # what angles() and grid tables both compute through
    monkeypatch.setattr(ndrope.functional, "_phase", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    q, k = torch.randn(B, H, 15, D), torch.randn(B, H, 15, D)
    for _ in range(3):  # three layers
        rope(q, k, (3, 5))
    assert calls == []
    rope(q[:, :, :12], k[:, :, :12], (3, 4))
    assert calls == [1]
