"""The Triton GPU kernel (`ndrope._triton`) behind ``ndrope::rotate`` on CUDA.

Without a GPU, the kernel runs on CPU tensors through Triton's interpreter: a second copy of
ndrope/_triton.py is imported with ``TRITON_INTERPRET=1`` (the decorator reads it when the module is
imported), so the real module, the one CUDA calls use, is never touched. Every case is compared with
a float64 rotation of the same inputs (tests/rope_reference.py): float32 within its own arithmetic
error, bfloat16 and float16 within one unit in the last place of the output. The ops' CUDA routing runs
on the interpreted kernel too, and what ``torch.compile`` records for CUDA tensors is traced with fake
CUDA tensors. The tests marked ``gpu`` run the same checks on a CUDA device (``python -m pytest -m gpu``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from rope_reference import pair_index, rotate_formula

import ndrope
from ndrope import _ops

param = pytest.mark.parametrize

B, H, N, D = 2, 3, 5, 16
LAYOUTS = ["half", "interleaved"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PAIRS = {"full": D // 2, "partial": 5}  # partial: 10 channels rotate, 6 pass through
# tables (..., N, P) against x (B, H, N, D); "expanded" is a per-head table that is a stride-0 view
TABLES = {"shared": (N,), "per_head": (H, N), "per_batch": (B, 1, N), "one_position": (1,), "expanded": (H, N)}
VIEWS = ["contiguous", "qkv", "bnhd", "broadcast"]
_MANTISSA_BITS = {torch.float32: 24, torch.bfloat16: 8, torch.float16: 11}


def load_interpreted() -> ModuleType:
    """ndrope/_triton.py imported afresh under its own name with TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401  (availability check)
    except ImportError as error:
        pytest.skip(f"triton cannot be imported ({error}); the GPU kernel is not tested here")
    source = Path(ndrope.__file__).with_name("_triton.py")
    spec = importlib.util.spec_from_file_location("ndrope._triton_interpreted", source)
    module = importlib.util.module_from_spec(spec)
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return module


@pytest.fixture(scope="module")
def interpreted() -> ModuleType:
    return load_interpreted()


def count_launches(kernels: ModuleType, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Every launch of ``kernels`` from now on: its arguments and program count."""
    launches: list[dict] = []
    real = kernels._launch

    def counted(traceable: bool, programs: int, **arguments) -> None:
        launches.append(dict(arguments, programs=programs))
        real(traceable, programs, **arguments)

    monkeypatch.setattr(kernels, "_launch", counted)
    return launches


@pytest.fixture
def kernels(interpreted: ModuleType, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The interpreted kernels, counting their launches in ``kernels.launches``."""
    monkeypatch.setattr(interpreted, "launches", count_launches(interpreted, monkeypatch), raising=False)
    return interpreted


def make_x(view: str, dtype: torch.dtype, seed: int = 0, heads: int = H, device: str = "cpu") -> torch.Tensor:
    """x (B, H, N, D) as attention layers hand it over: contiguous, q of timm's packed qkv (B, N, 3, H, D),
    a (B, N, H, D) projection transposed, or one (H, N, D) tensor broadcast over the batch."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if view == "contiguous":
        return randn(B, heads, N, D)
    if view == "qkv":
        return randn(B, N, 3, heads, D).permute(2, 0, 3, 1, 4)[0]
    if view == "bnhd":
        return randn(B, N, heads, D).transpose(1, 2)
    return randn(heads, N, D).expand(B, heads, N, D)


def make_tables(table: str, pairs: int, seed: int = 1, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos/sin of random angles in [-10, 10), as `ndrope.apply_rotary` hands them to the op."""
    g = torch.Generator().manual_seed(seed)
    leading = (1, N) if table == "expanded" else TABLES[table]
    theta = torch.rand(*leading, pairs, generator=g, dtype=torch.float64) * 20 - 10
    cos, sin = theta.cos().float().to(device), theta.sin().float().to(device)
    if table == "expanded":
        cos, sin = cos.expand(H, N, pairs), sin.expand(H, N, pairs)
    return cos, sin


def exact(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str, inverse: bool = False) -> torch.Tensor:
    """The rotation of the very same values in float64, unrounded."""
    return rotate_formula(x.double(), cos.double(), -sin.double() if inverse else sin.double(), layout)


def magnitude(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """|x1| |c| + |x2| |s| (and |x2| |c| + |x1| |s|) per output element, |x| on pass-through channels:
    float32 arithmetic errs by at most 2^-23 of it."""
    pairs = cos.shape[-1]
    first, second = pair_index(x.shape[-1], pairs, layout)
    size = x.abs().double()
    c, s = cos.abs().double(), sin.abs().double()
    out = size.expand(*torch.broadcast_shapes(size.shape[:-1], c.shape[:-1]), x.shape[-1]).clone()
    out[..., first] = size[..., first] * c + size[..., second] * s
    out[..., second] = size[..., second] * c + size[..., first] * s
    return out


def ulp(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` numbers at each float64 ``value`` (subnormal spacing at the bottom)."""
    bits = _MANTISSA_BITS[dtype]
    _, exponent = torch.frexp(value)
    spacing = torch.ldexp(torch.ones_like(value), exponent - bits)
    return spacing.clamp(min=torch.finfo(dtype).tiny * 2.0 ** (1 - bits))


def assert_rotation(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str, inverse: bool = False) -> None:
    """out within float32 arithmetic plus one unit in the last place of out's dtype of the exact rotation."""
    reference = exact(x, cos, sin, layout, inverse)
    assert out.shape == reference.shape and out.dtype == x.dtype and out.is_contiguous()
    error = (out.double() - reference).abs()
    bound = ulp(reference, out.dtype) + 2.0**-23 * magnitude(x, cos, sin, layout)
    worst = (error / bound).max().item()
    assert worst <= 1.0, f"{worst:.3g} times the bound (max error {error.max().item():.3g})"
    pass_through = 2 * cos.shape[-1]
    assert torch.equal(out[..., pass_through:], x.expand_as(out)[..., pass_through:])


def reference_grads(grad: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str, inverse: bool):
    """(grad_x, grad_cos, grad_sin) of the float64 rotation by autograd; table grads in cos's shape."""
    x64 = x.double().requires_grad_()
    cos64, sin64 = cos.double().requires_grad_(), sin.double().requires_grad_()
    out = rotate_formula(x64, cos64, -sin64 if inverse else sin64, layout)
    return torch.autograd.grad(out, (x64, cos64, sin64), grad.double())


def assert_backward(result, grad, x, cos, sin, layout: str, inverse: bool) -> None:
    grad_x, grad_cos, grad_sin = result
    ref_x, ref_cos, ref_sin = reference_grads(grad, x, cos, sin, layout, inverse)
    # grad_x is the rotation of grad by minus the angle (by plus it for an inverse rotation)
    assert_rotation(grad_x, grad, cos, sin, layout, inverse=not inverse)
    assert grad_cos.shape == cos.shape and grad_cos.dtype == torch.float32
    # float32 sums of at most B * H = 6 products of O(1) numbers
    torch.testing.assert_close(grad_cos.double(), ref_cos, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_sin.double(), ref_sin, atol=1e-5, rtol=1e-5)


class TestTritonInterpreted:
    """The kernel itself on CPU tensors, against float64."""

    @param("table", list(TABLES))
    @param("pairs", list(PAIRS))
    @param("layout", LAYOUTS)
    @param("dtype", DTYPES, ids=str)
    def test_triton_rotation_and_inverse_match_float64(self, kernels, dtype, layout, pairs, table):
        """Forward and inverse, every dtype and layout, partial rotation, shared / per-head / per-batch /
        one-position / stride-0 tables, with x the q of a packed qkv projection (read in place)."""
        x = make_x("qkv", dtype)
        cos, sin = make_tables(table, PAIRS[pairs])
        interleaved = layout == "interleaved"
        for inverse in (False, True):
            out = kernels.rotate(x, cos, sin, interleaved, inverse)
            assert_rotation(out, x, cos, sin, layout, inverse)
        assert len(kernels.launches) == 2  # no fallback

    @param("view", VIEWS)
    @param("layout", LAYOUTS)
    @param("dtype", DTYPES, ids=str)
    def test_triton_reads_every_view_of_x_in_place(self, kernels, dtype, layout, view):
        """Contiguous, timm's qkv view, a transposed (B, N, H, D) projection, a stride-0 batch."""
        x = make_x(view, dtype)
        cos, sin = make_tables("per_head", PAIRS["partial"])
        assert_rotation(kernels.rotate(x, cos, sin, layout == "interleaved", False), x, cos, sin, layout)
        assert len(kernels.launches) == 1

    @param("pairs, inverse", [("full", False), ("partial", True)])
    @param("table", list(TABLES))
    @param("layout", LAYOUTS)
    @param("dtype", DTYPES, ids=str)
    def test_triton_backward_matches_float64(self, kernels, dtype, layout, table, pairs, inverse):
        """grad_x by the inverse rotation and grad_cos / grad_sin summed over the rows the table
        broadcasts over, in one pass; grad is a strided view (of a packed qkv gradient)."""
        x = make_x("contiguous", dtype)
        grad = make_x("qkv", dtype, seed=7)
        cos, sin = make_tables(table, PAIRS[pairs])
        result = kernels.rotate_backward(grad, x, cos, sin, layout == "interleaved", inverse)
        assert_backward(result, grad, x, cos, sin, layout, inverse)
        assert len(kernels.launches) == 1 and kernels.launches[0]["BACKWARD"]

    @param("table", ["shared", "per_head", "per_batch", "one_position"])
    @param("layout", LAYOUTS)
    @param("dtype", [torch.float32, torch.bfloat16], ids=str)
    def test_triton_programs_that_loop_and_split_rows(self, kernels, monkeypatch, dtype, layout, table):
        """With 16-element steps and few programs each program loops over several steps, and the
        reduced rows are split between programs whose partial table gradients are then added: the same
        numbers, and the table gradients bitwise equal from run to run."""
        monkeypatch.setattr(kernels, "_TILE", 16)
        monkeypatch.setattr(kernels, "_TARGET_PROGRAMS", 4)
        x, grad = make_x("qkv", dtype), make_x("contiguous", dtype, seed=7)
        cos, sin = make_tables(table, PAIRS["partial"])
        interleaved = layout == "interleaved"
        assert_rotation(kernels.rotate(x, cos, sin, interleaved, False), x, cos, sin, layout)
        first = kernels.rotate_backward(grad, x, cos, sin, interleaved, False)
        assert_backward(first, grad, x, cos, sin, layout, False)
        second = kernels.rotate_backward(grad, x, cos, sin, interleaved, False)
        assert all(torch.equal(a, b) for a, b in zip(first, second))
        backward = kernels.launches[1]
        assert backward["n_splits"] > 1, backward
        if table != "per_head":  # per head, only the batch's 2 rows are reduced: one step per program
            assert backward["steps_per_program"] > 1, backward

    @param("layout", LAYOUTS)
    def test_triton_pair_of_one_shape_is_one_launch(self, kernels, layout):
        """q and k of the same shape and strides (views of one qkv) go through a single launch."""
        qkv = torch.randn(B, N, 3, H, D, generator=torch.Generator().manual_seed(3)).bfloat16().permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        cos, sin = make_tables("per_head", PAIRS["partial"])
        out_q, out_k = kernels.rotate_pair(q, k, cos, sin, layout == "interleaved", False)
        assert_rotation(out_q, q, cos, sin, layout)
        assert_rotation(out_k, k, cos, sin, layout)
        assert len(kernels.launches) == 1 and kernels.launches[0]["PAIR"]

    def test_triton_pair_of_two_shapes_takes_two_launches(self, kernels):
        """Grouped-query attention: k has fewer heads than q; each still gets its own rotation."""
        q, k = make_x("contiguous", torch.float16), make_x("bnhd", torch.float16, seed=4, heads=1)
        cos, sin = make_tables("shared", PAIRS["full"])
        out_q, out_k = kernels.rotate_pair(q, k, cos, sin, False, False)
        assert_rotation(out_q, q, cos, sin, "half")
        assert_rotation(out_k, k, cos, sin, "half")
        assert len(kernels.launches) == 2 and not any(launch["PAIR"] for launch in kernels.launches)

    def test_triton_launch_plans_are_kept_per_geometry(self, kernels, monkeypatch):
        """Eager calls reuse the launch arguments worked out for a geometry (shape, strides, layout); a
        full cache is cleared, and every geometry still gets its own."""
        monkeypatch.setattr(kernels, "_CALLS", {})
        monkeypatch.setattr(kernels, "_MAX_CALLS", 2)
        cos, sin = make_tables("shared", PAIRS["partial"])
        for _ in range(2):
            for view in VIEWS:
                x = make_x(view, torch.float32)
                for layout in LAYOUTS:
                    assert_rotation(kernels.rotate(x, cos, sin, layout == "interleaved", False), x, cos, sin, layout)
        assert 1 <= len(kernels._CALLS) <= 2

    def test_triton_empty_input_launches_nothing(self, kernels):
        x = torch.empty(0, H, N, D)
        cos, sin = make_tables("shared", 4)
        assert kernels.rotate(x, cos, sin, False, False).shape == x.shape
        grad_x, grad_cos, grad_sin = kernels.rotate_backward(x, x, cos, sin, False, False)
        assert grad_x.shape == x.shape and not grad_cos.any() and not grad_sin.any()
        assert kernels.launches == []

    def test_triton_geometry_beyond_the_kernel_is_declined(self, kernels):
        """Rows whose strides cannot be merged into 3 reduced + 2 kept dims: the kernel declines (None)
        and the op runs the torch formula instead (next class)."""
        base = torch.randn(2, 3, 2, 3, N, D)  # 5 row dims that a permutation keeps from merging
        x = base.permute(3, 0, 2, 1, 4, 5)
        cos, sin = make_tables("one_position", 4)
        assert kernels.rotate(x, cos, sin, False, False) is None
        assert kernels.launches == []


def test_triton_is_imported_on_the_first_cuda_rotation_only():
    """`import ndrope` and CPU rotations never import triton (nor the kernel module, whose decorators read
    TRITON_INTERPRET when it is imported)."""
    code = (
        "import sys, torch, ndrope\n"
        "x = torch.randn(2, 3, 4, 8, requires_grad=True)\n"
        "ndrope.apply_rotary(x, torch.randn(4, 4)).sum().backward()\n"
        "print(sorted(m for m in ('triton', 'ndrope._triton') if m in sys.modules))\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


class TestTritonOpRouting:
    """The ops' CUDA implementations (`ndrope._ops`), run here on CPU tensors with the interpreted kernel."""

    @pytest.fixture(autouse=True)
    def use_interpreted(self, kernels, monkeypatch):
        monkeypatch.setattr(_ops, "gpu_kernels", lambda: kernels)

    def test_triton_kernels_are_registered_for_cuda(self):
        for name in ("rotate", "rotate_pair", "rotate_backward"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ndrope::{name}", "CUDA"), name

    @param("layout", LAYOUTS)
    def test_triton_cuda_ops_run_the_kernel(self, kernels, layout):
        x, k = make_x("qkv", torch.bfloat16), make_x("qkv", torch.bfloat16, seed=2)
        cos, sin = make_tables("per_head", PAIRS["full"])
        interleaved = layout == "interleaved"
        assert_rotation(_ops._rotate_cuda(x, cos, sin, interleaved, False), x, cos, sin, layout)
        out_q, out_k = _ops._rotate_pair_cuda(x, k, cos, sin, interleaved, False)
        assert_rotation(out_q, x, cos, sin, layout)
        assert_rotation(out_k, k, cos, sin, layout)
        assert_backward(_ops._rotate_backward_cuda(k, x, cos, sin, interleaved, False), k, x, cos, sin, layout, False)
        assert [(launch["PAIR"], launch["BACKWARD"]) for launch in kernels.launches] == [(False, False), (True, False), (False, True)]

    @param(
        "case", ["float64", "float64_tables", "strided_last_dim", "strided_table", "beyond_the_kernel", "no_pairs"]
    )
    def test_triton_cuda_ops_fall_back_to_the_formula(self, kernels, case):
        """What the kernel does not take runs the torch formula, with the same result."""
        x = make_x("contiguous", torch.float32)
        cos, sin = make_tables("shared", 4)
        if case == "float64":
            x, cos, sin = x.double(), cos.double(), sin.double()
        elif case == "float64_tables":
            cos, sin = cos.double(), sin.double()
        elif case == "strided_last_dim":
            x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
        elif case == "strided_table":
            cos = torch.stack((cos, cos), dim=-1)[..., 0]
        elif case == "beyond_the_kernel":
            x = torch.randn(2, 3, 2, 3, N, D).permute(3, 0, 2, 1, 4, 5)
            cos, sin = make_tables("one_position", 4)
        else:
            cos, sin = cos[..., :0], sin[..., :0]
        out = _ops._rotate_cuda(x, cos, sin, False, False)
        torch.testing.assert_close(out.double(), exact(x, cos, sin, "half"), atol=1e-6, rtol=1e-6)
        grad_x, grad_cos, _ = _ops._rotate_backward_cuda(x, x, cos, sin, False, False)
        reference = reference_grads(x, x, cos, sin, "half", False)
        torch.testing.assert_close((grad_x.double(), grad_cos.double()), reference[:2], atol=1e-5, rtol=1e-5)
        assert kernels.launches == []

    @param("op", ["rotate", "rotate_pair", "rotate_backward"])
    def test_triton_cuda_ops_refuse_tables_on_another_device(self, kernels, op):
        x = make_x("contiguous", torch.float32)
        cos, sin = make_tables("shared", 4)
        cos = cos.to("meta")
        with pytest.raises(ValueError, match=r"cos is on meta but (x|q) is on cpu"):
            if op == "rotate":
                _ops._rotate_cuda(x, cos, sin, False, False)
            elif op == "rotate_pair":
                _ops._rotate_pair_cuda(x, x, cos, sin, False, False)
            else:
                _ops._rotate_backward_cuda(x, x, cos, sin, False, False)
        assert kernels.launches == []


def real_kernels() -> ModuleType:
    """The module CUDA calls use; its kernel must be compiled (not interpreted) for tracing."""
    try:
        import triton  # noqa: F401  (availability check)
    except ImportError as error:
        pytest.skip(f"triton cannot be imported ({error})")
    if os.environ.get("TRITON_INTERPRET") not in (None, "", "0"):
        pytest.skip("TRITON_INTERPRET is set for the whole process: the real kernel is interpreted and cannot be traced")
    kernels = _ops.gpu_kernels()
    assert kernels is not None
    return kernels


def trace_on_fake_cuda(fn, *shapes_and_dtypes) -> str:
    """The forward graph AOTDispatcher (torch.compile's middle layer) records for ``fn`` on fake CUDA
    tensors: no GPU is needed to see what Inductor would be given."""
    from functorch.compile import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode

    graphs: list[str] = []

    def capture(graph, inputs):
        graphs.append(graph.code)
        return graph

    with FakeTensorMode():
        inputs = [torch.empty(shape, dtype=dtype, device="cuda") for shape, dtype in shapes_and_dtypes]
        aot_function(fn, fw_compiler=capture)(*inputs)
    return graphs[0]


def compiled_rotations(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    rotated = ndrope.apply_rotary(q, (cos, sin))
    pair = ndrope.apply_rotary_pair(q, k, (cos, sin), layout="interleaved")
    grads = torch.ops.ndrope.rotate_backward(k, q, cos, sin, False, False)
    return rotated, *pair, *grads


FAKE_INPUTS = [((B, H, N, D), torch.bfloat16), ((B, H, N, D), torch.bfloat16), ((N, 8), torch.float32), ((N, 8), torch.float32)]


@pytest.mark.filterwarnings("ignore::UserWarning")
class TestTritonUnderCompile:
    """What ``torch.compile`` gets for CUDA tensors: the Triton launch, not an opaque op (the formula
    choice, `ndrope.set_compiled_rotation`, is tested in tests/test_ops.py)."""

    def test_triton_launch_is_what_compile_records_on_cuda(self):
        real_kernels()
        code = trace_on_fake_cuda(compiled_rotations, *FAKE_INPUTS)
        assert code.count("triton_kernel_wrapper_functional(") == 3, code  # rotate, the pair in one, backward
        assert "'PAIR': True" in code and "'BACKWARD': True" in code
        assert "ndrope" not in code

    def test_triton_symbolic_sizes_guard_only_on_block_thresholds(self):
        """Under dynamic shapes the launch stays symbolic in the token count: its guards (N >= 16 for the
        row block, and the launch counts' 0/1 specialisation) hold at 224, 256, 288 and 384 px, so those
        resolutions reuse the graph."""
        real_kernels()
        from functorch.compile import aot_function
        from torch._dynamo.source import ConstantSource
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

        env = ShapeEnv()
        symbol = env.create_symbol(197, source=ConstantSource("tokens"), dynamic_dim=DimDynamic.DYNAMIC)
        tokens = env.create_symintnode(symbol, hint=197)
        graphs = []
        with FakeTensorMode(shape_env=env):
            q, k = (torch.empty(8, 3, tokens, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            cos, sin = (torch.empty(tokens, 32, device="cuda") for _ in range(2))
            aot_function(compiled_rotations, fw_compiler=lambda g, _: graphs.append(g.code) or g, dynamic=True)(q, k, cos, sin)
        assert graphs[0].count("triton_kernel_wrapper_functional(") == 3
        on_tokens = [guard.expr for guard in env.guards if symbol in guard.expr.free_symbols]
        assert f"{symbol} >= 16" in map(str, on_tokens)
        for side in (14, 16, 18, 24):  # the patch grids of ViT-B/16 at 224-384 px, with the class token
            held = [bool(guard.xreplace({symbol: side * side + 1})) for guard in on_tokens]
            assert all(held), [str(g) for g, ok in zip(on_tokens, held) if not ok]

    def test_triton_cpu_tensors_keep_the_op_under_compile(self):
        """On CPU the C++ kernel stays one node (what the CPU always had)."""
        graphs = []

        def capture(graph, inputs):
            graphs.append(graph.code)
            return graph

        from functorch.compile import aot_function

        x = make_x("contiguous", torch.float32)
        cos, sin = make_tables("shared", 4)
        aot_function(lambda x, c, s: ndrope.apply_rotary(x, (c, s)), fw_compiler=capture)(x, cos, sin)
        assert graphs[0].count("ndrope.rotate.default") == 1



@pytest.fixture
def gpu_launches(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The eager launches of the real (compiled) kernel on CUDA."""
    return count_launches(real_kernels(), monkeypatch)


def on_cpu(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().cpu() for t in tensors]


@pytest.mark.gpu
class TestTritonOnGPU:
    """The same kernel compiled for the GPU, through the public functions (``python -m pytest -m gpu``)."""

    @param("view", VIEWS)
    @param("table", list(TABLES))
    @param("layout", LAYOUTS)
    @param("dtype", DTYPES, ids=str)
    def test_triton_gpu_rotation_and_gradients(self, gpu_launches, dtype, layout, table, view):
        """`apply_rotary` on CUDA: values and learned-table gradients against float64 (the interpreter's
        bounds), and against the torch formula on the same GPU within one unit in the last place."""
        x = make_x(view, dtype, device="cuda")  # the view itself (clone would make it contiguous)
        cos, sin = make_tables(table, PAIRS["partial"], device="cuda")
        with torch.no_grad():
            out = ndrope.apply_rotary(x, (cos, sin), layout=layout)
        assert_rotation(out.cpu(), *on_cpu(x, cos, sin), layout)
        formula = _ops._rotate_torch(x, cos, sin, layout == "interleaved", False).cpu().double()
        bound = ulp(formula, dtype) + 2.0**-22 * magnitude(*on_cpu(x, cos, sin), layout)  # each rounds once
        assert ((out.cpu().double() - formula).abs() <= bound).all()
        # learned tables: grad_x and the table gradients, with a strided incoming gradient
        x_leaf, cos_leaf, sin_leaf = (t.detach().clone().requires_grad_() for t in (x, cos, sin))
        grad = make_x("qkv", dtype, seed=7, device="cuda")
        ndrope.apply_rotary(x_leaf, (cos_leaf, sin_leaf), layout=layout).backward(grad)
        result = on_cpu(x_leaf.grad, cos_leaf.grad, sin_leaf.grad)
        assert_backward(result, *on_cpu(grad, x_leaf, cos, sin), layout, False)
        assert [launch["BACKWARD"] for launch in gpu_launches] == [False, False, True]

    @param("layout", LAYOUTS)
    def test_triton_gpu_pair_in_one_launch(self, gpu_launches, layout):
        qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=torch.bfloat16).permute(2, 0, 3, 1, 4)
        cos, sin = make_tables("shared", PAIRS["full"], device="cuda")
        out_q, out_k = ndrope.apply_rotary_pair(qkv[0], qkv[1], (cos, sin), layout=layout)
        assert_rotation(out_q.cpu(), *on_cpu(qkv[0], cos, sin), layout)
        assert_rotation(out_k.cpu(), *on_cpu(qkv[1], cos, sin), layout)
        assert len(gpu_launches) == 1 and gpu_launches[0]["PAIR"]

    @param("choice", ["kernel", "formula"])
    def test_triton_gpu_compiled_rotation_equals_eager(self, choice):
        """torch.compile (Inductor) of a rotation with either choice, forward and backward."""
        torch.compiler.reset()
        previous = ndrope.set_compiled_rotation(choice)
        try:
            x = make_x("qkv", torch.bfloat16, device="cuda").requires_grad_()
            cos, sin = (t.requires_grad_() for t in make_tables("per_head", PAIRS["partial"], device="cuda"))
            compiled = torch.compile(lambda x, c, s: ndrope.apply_rotary(x, (c, s)), fullgraph=True)
            out = compiled(x, cos, sin)
            out.float().square().sum().backward()
        finally:
            ndrope.set_compiled_rotation(previous)
        eager = [t.detach().clone().requires_grad_() for t in (x, cos, sin)]
        reference = ndrope.apply_rotary(eager[0], (eager[1], eager[2]))
        reference.float().square().sum().backward()
        torch.testing.assert_close(out, reference, atol=1e-2, rtol=1e-2)
        for got, want in zip((x.grad, cos.grad, sin.grad), (t.grad for t in eager)):
            torch.testing.assert_close(got, want, atol=5e-2, rtol=1e-2)

    @param("pos_embed", ["rope_axial", "rope_mixed"])
    def test_triton_gpu_compiled_vit_fullgraph_dynamic_at_three_resolutions(self, pos_embed):
        """A two-block ViT-S/16-wide RoPE model compiled once with fullgraph=True, dynamic=True: forward and backward
        at 224, 256 and 288 px equal eager's."""
        import vit

        torch.compiler.reset()
        torch.manual_seed(0)
        model = vit.NDRopeVisionTransformer(pos_embed, img_size=224, patch_size=16, embed_dim=384, depth=2, num_heads=6, num_classes=10)
        model = model.cuda().train()
        compiled = torch.compile(model, fullgraph=True, dynamic=True)
        for size in (224, 256, 288):
            images = torch.randn(4, 3, size, size, device="cuda", generator=torch.Generator("cuda").manual_seed(size))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = compiled(images).float().square().mean()
            loss.backward()
            grads = {name: p.grad.clone() for name, p in model.named_parameters()}
            model.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                expected_loss = model(images).float().square().mean()
            expected_loss.backward()
            torch.testing.assert_close(loss, expected_loss, atol=2e-2, rtol=2e-2)
            for name, p in model.named_parameters():
                torch.testing.assert_close(grads[name], p.grad, atol=5e-2, rtol=5e-2, msg=name)
            model.zero_grad()

    @pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
    def test_triton_gpu_lightning_fit_in_bf16(self, data, tmp_path, gpu_launches):
        """`train.py fit --config configs/fashion_mnist.yaml --trainer.fast_dev_run true
        --trainer.accelerator gpu --trainer.precision bf16-mixed`, on the tests' small Fashion-MNIST files."""
        from training.cli import cli_main

        root = Path(__file__).resolve().parents[1]
        cli = cli_main([
            "fit", "--config", str(root / "configs" / "fashion_mnist.yaml"), f"--data.root={data / 'fashion'}",
            "--trainer.fast_dev_run=true", "--trainer.accelerator=gpu", "--trainer.precision=bf16-mixed",
            f"--trainer.default_root_dir={tmp_path}",
        ])
        assert cli.trainer.global_step == 1
        assert any(launch["BACKWARD"] is False for launch in gpu_launches)  # the rotation ran on the kernel
