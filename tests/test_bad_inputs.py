"""The one home of bad-input tests for `ndrope` and `vit`: each must raise ValueError/TypeError naming what is wrong.

Every row is (what the user did, the call, a string the message must contain). The sweep is also the
count behind "bad inputs: X clear of Y tried" (run `python -m pytest tests/test_bad_inputs.py -q`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch

import ndrope
import vit

SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=3)


# the inputs of the calls below, built when a case runs (nothing is built at import)
def x4() -> torch.Tensor:
    return torch.randn(1, 2, 16, 8)


def F2() -> torch.Tensor:  # the frequency matrix F of 2 axes
    return ndrope.axial_frequencies(8, 2)


def cs() -> tuple[torch.Tensor, torch.Tensor]:
    return ndrope.cos_sin(ndrope.angles(ndrope.grid((4, 4)), F2()))


@functools.cache
def model() -> vit.NDRopeVisionTransformer:
    return vit.NDRopeVisionTransformer("rope_axial", **SMALL)


def image() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16)


CASES: list[tuple[str, Callable[[], object], str]] = [
    # frequencies
    ("odd dim", lambda: ndrope.axial_frequencies(7, 1), "dim=7"),
    ("dim as float", lambda: ndrope.axial_frequencies(8.0, 1), "dim=8.0"),
    ("zero axes", lambda: ndrope.axial_frequencies(8, 0), "n_axes=0"),
    ("more axes than pairs", lambda: ndrope.axial_frequencies(4, 3), "n_axes=3"),
    ("negative theta", lambda: ndrope.axial_frequencies(8, 1, theta=-1.0), "theta=-1.0"),
    ("nan theta", lambda: ndrope.axial_frequencies(8, 1, theta=float("nan")), "theta=nan"),
    ("theta as string", lambda: ndrope.axial_frequencies(8, 1, theta="1e4"), "theta='1e4'"),
    ("axis_dims wrong sum", lambda: ndrope.axial_frequencies(8, 2, axis_dims=(1, 1)), "axis_dims=(1, 1)"),
    ("axis_dims wrong length", lambda: ndrope.axial_frequencies(8, 2, axis_dims=(4,)), "axis_dims=(4,)"),
    ("mixed without heads", lambda: ndrope.mixed_frequencies(8, 2, 0), "num_heads=0"),
    ("ntk nan scale", lambda: ndrope.ntk_scaled_frequencies(F2(), [float("nan"), 1.0]), "scale entry=nan"),
    ("ntk inf scale", lambda: ndrope.ntk_scaled_frequencies(F2(), [float("inf"), 1.0]), "scale entry=inf"),
    ("ntk wrong length", lambda: ndrope.ntk_scaled_frequencies(F2(), [2.0]), "scale=[2.0]"),
    ("ntk empty scale", lambda: ndrope.ntk_scaled_frequencies(F2(), []), "scale=[]"),
    ("ntk integer freqs", lambda: ndrope.ntk_scaled_frequencies(F2().long(), [2.0, 2.0]), "freqs must be a floating"),
    ("ntk nan freqs", lambda: ndrope.ntk_scaled_frequencies(F2() * float("nan"), [2.0, 2.0]), "freqs contains non-finite"),
    ("module nan freqs", lambda: ndrope.RotaryEmbedding.from_frequencies(F2() * float("inf")), "freqs contains non-finite"),
    # positions
    ("grid with a zero size", lambda: ndrope.grid((0, 4)), "shape=(0, 4)"),
    ("grid as string", lambda: ndrope.grid("4x4"), "shape='4x4'"),
    ("grid offset string", lambda: ndrope.grid((2, 2), offset="a"), "offset='a'"),
    ("grid reference of other rank", lambda: ndrope.grid((2, 2), reference_shape=(2,)), "reference_shape=(2,)"),
    ("multimodal empty", lambda: ndrope.multimodal_positions([]), "segments=[]"),
    ("multimodal negative text", lambda: ndrope.multimodal_positions([-1]), "segments[0] (text length)=-1"),
    ("multimodal grid too many axes", lambda: ndrope.multimodal_positions([(2, 2, 2)], n_axes=2), "segments[0]=(2, 2, 2)"),
    ("augment negative shift", lambda: ndrope.augment_positions(torch.zeros(4, 2), shift=-1.0), "shift=-1.0"),
    ("augment jitter below 1", lambda: ndrope.augment_positions(torch.zeros(4, 2), jitter=0.5), "jitter=0.5"),
    ("augment nan rescale", lambda: ndrope.augment_positions(torch.zeros(4, 2), rescale=float("nan")), "rescale=nan"),
    ("augment complex positions", lambda: ndrope.augment_positions(torch.zeros(4, 2, dtype=torch.complex64)), "positions must be a real"),
    # angles
    ("angles axes mismatch", lambda: ndrope.angles(torch.zeros(4, 3), F2()), "n_axes=2"),
    ("angles nan positions", lambda: ndrope.angles(torch.tensor([[float("nan"), 0.0]]), F2()), "positions contains non-finite"),
    ("angles nan freqs", lambda: ndrope.angles(torch.zeros(4, 2), F2() * float("nan")), "freqs contains non-finite"),
    ("angles list positions", lambda: ndrope.angles([[0.0, 1.0]], F2()), "positions must be a torch.Tensor"),
    ("angles bool positions", lambda: ndrope.angles(torch.zeros(4, 2, dtype=torch.bool), F2()), "positions must be a real"),
    ("angles bfloat16 positions", lambda: ndrope.angles(torch.zeros(4, 2, dtype=torch.bfloat16), F2()), "positions has dtype torch.bfloat16"),
    ("angles float16 positions", lambda: ndrope.angles(torch.zeros(4, 2, dtype=torch.float16), F2()), "positions has dtype torch.float16"),
    ("angles int64 beyond 2**53", lambda: ndrope.angles(torch.tensor([[2**53 + 1, 0]]), F2()), "integers beyond 2**53"),
    ("rotation bfloat16 positions", lambda: ndrope.RotaryEmbedding(8, 2).rotation(torch.zeros(4, 2, dtype=torch.bfloat16)), "positions has dtype torch.bfloat16"),
    ("grid in bfloat16", lambda: ndrope.grid((4, 4), dtype=torch.bfloat16), "dtype has dtype torch.bfloat16"),
    ("multimodal in float16", lambda: ndrope.multimodal_positions([2, (2, 2)], dtype=torch.float16), "dtype has dtype torch.float16"),
    ("augment bfloat16 positions", lambda: ndrope.augment_positions(torch.zeros(4, 2, dtype=torch.bfloat16)), "positions has dtype torch.bfloat16"),
    ("angles meta freqs", lambda: ndrope.angles(torch.zeros(4, 2), F2().to("meta")), "freqs is on meta"),
    ("angles 4D freqs", lambda: ndrope.angles(torch.zeros(4, 2), torch.zeros(1, 1, 2, 4)), "freqs must be (A, P) or (H, A, P)"),
    ("angles integer dtype", lambda: ndrope.angles(torch.zeros(4, 2), F2(), dtype=torch.int32), "dtype=torch.int32"),
    # apply_rotary
    ("layout typo", lambda: ndrope.apply_rotary(x4(), cs(), layout="halves"), "layout='halves'"),
    ("integer cos/sin", lambda: ndrope.apply_rotary(x4(), (cs()[0].long(), cs()[1].long())), "cos must be a floating"),
    ("cos/sin shapes differ", lambda: ndrope.apply_rotary(x4(), (cs()[0], cs()[1][:2])), "must have the same shape"),
    ("sin on meta", lambda: ndrope.apply_rotary(x4(), (cs()[0], cs()[1].to("meta"))), "sin is on meta"),
    ("rotation on meta", lambda: ndrope.apply_rotary(x4(), (cs()[0].to("meta"), cs()[1].to("meta"))), "the rotation is on meta"),
    ("integer x", lambda: ndrope.apply_rotary(x4().long(), cs()), "x must be a floating"),
    ("too many pairs", lambda: ndrope.apply_rotary(x4()[..., :4], cs()), "x has only D=4 channels"),
    ("token count", lambda: ndrope.apply_rotary(x4()[..., :15, :], cs()), "x has N=15 tokens"),
    ("rotation not a pair", lambda: ndrope.apply_rotary(x4(), [cs()[0]]), "rotation must be a Tensor of angles or a (cos, sin) pair"),
    ("heads do not broadcast", lambda: ndrope.apply_rotary(x4(), torch.zeros(3, 16, 4)), "do not broadcast"),
    # RotaryEmbedding
    ("module odd dim", lambda: ndrope.RotaryEmbedding(7, 1), "dim=7"),
    ("module layout typo", lambda: ndrope.RotaryEmbedding(8, 1, layout="x"), "layout='x'"),
    ("module reference of other rank", lambda: ndrope.RotaryEmbedding(8, 2, reference_shape=(4,)), "reference_shape=(4,)"),
    ("module mode typo", lambda: ndrope.RotaryEmbedding(8, 2).rotation((4, 4), mode="bicubic"), "mode='bicubic'"),
    ("module interpolate without reference", lambda: ndrope.RotaryEmbedding(8, 2).rotation((4, 4), mode="interpolate"), "needs reference_shape"),
    ("module grid of other rank", lambda: ndrope.RotaryEmbedding(8, 2).rotation((4,)), "grid_shape=(4,)"),
    ("module negative prefix", lambda: ndrope.RotaryEmbedding(8, 2).rotation((4, 4), num_prefix_tokens=-1), "num_prefix_tokens=-1"),
    ("module too few tokens", lambda: ndrope.RotaryEmbedding(8, 2)(x4()[..., :3, :], x4()[..., :3, :], (4, 4)), "q has 3 tokens"),
    ("module q/k mismatch", lambda: ndrope.RotaryEmbedding(8, 2)(x4(), x4()[..., :8, :], (4, 4)), "k has 8"),
    ("module 4D freqs", lambda: ndrope.RotaryEmbedding.from_frequencies(torch.zeros(1, 1, 2, 4)), "freqs must be a floating (A, P) or (H, A, P)"),
    ("module learnable not bool", lambda: ndrope.RotaryEmbedding.from_frequencies(F2(), learnable="yes"), "learnable='yes'"),
    # vit construction
    ("pos_embed typo", lambda: vit.NDRopeVisionTransformer("rope", **SMALL), "pos_embed='rope'"),
    ("global_pool typo", lambda: vit.NDRopeVisionTransformer("learned", global_pool="maxx", **SMALL), "global_pool='maxx'"),
    ("img_size not a multiple", lambda: vit.NDRopeVisionTransformer("learned", **dict(SMALL, img_size=18)), "img_size=(18, 18)"),
    ("embed_dim not divisible", lambda: vit.NDRopeVisionTransformer("learned", **dict(SMALL, num_heads=3)), "embed_dim=32 must be divisible by num_heads=3"),
    ("head_dim too small for RoPE", lambda: vit.NDRopeVisionTransformer("rope_axial", ndim=3, **dict(SMALL, embed_dim=8, num_heads=2, img_size=8)), "head_dim"),
    ("resolution mode typo", lambda: vit.NDRopeVisionTransformer("rope_axial", rope_resolution_mode="zoom", **SMALL), "rope_resolution_mode='zoom'"),
    ("negative rope_shift", lambda: vit.NDRopeVisionTransformer("rope_axial", rope_shift=-1.0, **SMALL), "rope_shift=-1.0"),
    ("rope_theta zero", lambda: vit.NDRopeVisionTransformer("rope_axial", rope_theta=0.0, **SMALL), "rope_theta=0.0"),
    ("negative reg_tokens", lambda: vit.NDRopeVisionTransformer("learned", reg_tokens=-1, **SMALL), "reg_tokens=-1"),
    ("patch_drop_rate 1.5", lambda: vit.NDRopeVisionTransformer("learned", patch_drop_rate=1.5, **SMALL), "patch_drop_rate=1.5"),
    ("drop_rate 2", lambda: vit.NDRopeVisionTransformer("learned", drop_rate=2, **SMALL), "dropout probability has to be between 0 and 1, but got 2"),
    ("weight_init typo", lambda: vit.NDRopeVisionTransformer("learned", weight_init="xavier", **SMALL), "weight_init='xavier'"),
    ("dynamic_img_size given", lambda: vit.NDRopeVisionTransformer("learned", dynamic_img_size=False, **SMALL), "dynamic_img_size"),
    ("block_fn of another kind", lambda: vit.NDRopeVisionTransformer("learned", block_fn=torch.nn.Identity, **SMALL), "block_fn="),
    ("rope_recipe on learned", lambda: vit.NDRopeVisionTransformer("learned", rope_recipe="dinov3", **SMALL), "rope_recipe needs a RoPE pos_embed"),
    ("set_resolution_mode typo", lambda: model().set_resolution_mode("zoom"), "mode='zoom'"),
    ("set_resolution_mode without RoPE", lambda: vit.NDRopeVisionTransformer("learned", **SMALL).set_resolution_mode("interpolate"), "does not apply to pos_embed='learned'"),
    ("resolution mode with a recipe", lambda: vit.NDRopeVisionTransformer("rope_axial", rope_recipe="dinov3", rope_resolution_mode="ntk", **SMALL), "rope_resolution_mode='ntk' does not apply"),
    # vit forward
    ("empty batch", lambda: model()(image()[:0]), "a batch of 0 samples"),
    ("empty axis", lambda: model()(torch.randn(2, 3, 0, 16)), "has an empty axis"),
    ("uint8 images", lambda: model()(image().to(torch.uint8)), "x has dtype torch.uint8"),
    ("bf16 into fp32 model", lambda: model()(image().bfloat16()), "x has dtype torch.bfloat16"),
    ("fp16 into fp32 model", lambda: model()(image().half()), "x has dtype torch.float16"),
    ("float64 into fp32 model", lambda: model()(image().double()), "x has dtype torch.float64"),
    ("wrong rank", lambda: model()(image()[0]), "expected rank 4"),
    ("wrong channels", lambda: model()(image()[:, :1]), "in_chans=3"),
    ("size not a multiple", lambda: model()(torch.randn(2, 3, 18, 16)), "not a multiple of patch_size"),
    ("attn_mask of the wrong shape", lambda: model()(image(), attn_mask=torch.ones(3, 3, dtype=torch.bool)), "attn_mask has shape (3, 3)"),
    ("attn_mask integer", lambda: model()(image(), attn_mask=torch.ones(17, 17, dtype=torch.long)), "attn_mask has dtype torch.int64"),
    ("attn_mask on meta", lambda: model()(image(), attn_mask=torch.ones(17, 17, device="meta")), "attn_mask is on meta"),
    ("not a tensor", lambda: model()([1, 2]), "x must be a torch.Tensor"),
    ("output_fmt typo", lambda: model().forward_intermediates(image(), output_fmt="NHWC"), "output_fmt='NHWC'"),
]


@pytest.mark.parametrize("what, call, named", CASES, ids=[case[0] for case in CASES])
def test_bad_input_raises_a_clear_error(what, call, named):
    with pytest.raises((ValueError, TypeError)) as caught:
        call()
    assert named in str(caught.value), f"{what}: {type(caught.value).__name__}: {caught.value}"


# ------------------------------------------------------------------ the functional API, one test per case


class TestFrequencyArguments:
    @pytest.mark.parametrize("dim", [7, 1, 0])
    def test_odd_or_tiny_dim(self, dim):
        with pytest.raises(ValueError, match=rf"dim={dim} must be"):
            ndrope.axial_frequencies(dim, 1)

    def test_non_int_dim(self):
        with pytest.raises(TypeError, match=r"dim=16.0 must be an int"):
            ndrope.axial_frequencies(16.0, 2)

    def test_axis_dims_must_add_up(self):
        with pytest.raises(ValueError, match=r"axis_dims=\(4, 3\) must add up to dim // 2=8 pairs, got 7"):
            ndrope.axial_frequencies(16, 2, axis_dims=(4, 3))

    def test_axis_dims_one_per_axis(self):
        with pytest.raises(ValueError, match=r"axis_dims=\(8,\) must have one entry per axis \(n_axes=2\)"):
            ndrope.axial_frequencies(16, 2, axis_dims=(8,))

    def test_too_many_axes_for_dim(self):
        with pytest.raises(ValueError, match=r"dim // 2=2 pairs cannot be shared by n_axes=3"):
            ndrope.axial_frequencies(4, 3)

    @pytest.mark.parametrize("theta", [0.0, -1.0, float("inf")])
    def test_bad_theta(self, theta):
        with pytest.raises(ValueError, match=r"theta=.* must be a finite number > 0"):
            ndrope.axial_frequencies(8, 1, theta=theta)
        with pytest.raises(ValueError, match=r"theta=.* must be a finite number > 0"):
            ndrope.mixed_frequencies(8, 2, 1, theta=theta)
        with pytest.raises(ValueError, match=r"theta=.* must be a finite number > 0"):
            ndrope.RotaryEmbedding(8, 1, theta=theta)

    def test_non_number_theta(self):
        with pytest.raises(TypeError, match=r"theta='100' must be a finite number > 0"):
            ndrope.axial_frequencies(8, 1, theta="100")

    def test_bad_num_heads(self):
        with pytest.raises(ValueError, match=r"num_heads=0 must be an int >= 1"):
            ndrope.mixed_frequencies(8, 2, 0)

    def test_bad_n_axes(self):
        with pytest.raises(ValueError, match=r"n_axes=0 must be an int >= 1"):
            ndrope.axial_frequencies(8, 0)


class TestAnglesArguments:
    def test_positions_last_dim_must_match_axes(self):
        with pytest.raises(ValueError, match=r"positions has 3 coordinates per token .* freqs has n_axes=2"):
            ndrope.angles(torch.zeros(4, 3), ndrope.axial_frequencies(8, 2))

    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_non_finite_positions(self, bad):
        positions = torch.zeros(4, 2)
        positions[1, 0] = bad
        with pytest.raises(ValueError, match="positions contains non-finite values"):
            ndrope.angles(positions, ndrope.axial_frequencies(8, 2))

    def test_wrong_ranks(self):
        with pytest.raises(ValueError, match=r"positions must have rank >= 2, got shape \(4,\)"):
            ndrope.angles(torch.zeros(4), ndrope.axial_frequencies(8, 1))
        with pytest.raises(ValueError, match=r"freqs must be \(A, P\) or \(H, A, P\), got shape \(1, 2, 2, 4\)"):
            ndrope.angles(torch.zeros(4, 2), torch.zeros(1, 2, 2, 4))

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="positions must be a torch.Tensor, got list"):
            ndrope.angles([[0.0, 1.0]], ndrope.axial_frequencies(8, 2))

    def test_complex_positions(self):
        with pytest.raises(TypeError, match="positions must be a real"):
            ndrope.angles(torch.zeros(4, 1, dtype=torch.complex64), ndrope.axial_frequencies(8, 1))


class TestApplyRotaryArguments:
    def test_unknown_layout(self):
        with pytest.raises(ValueError, match=r"layout='neox' is not supported; choose one of \['half', 'interleaved'\]"):
            ndrope.apply_rotary(torch.zeros(1, 4, 8), torch.zeros(4, 4), layout="neox")

    def test_too_many_pairs_for_the_head(self):
        with pytest.raises(ValueError, match=r"the rotation turns 8 pairs = 16 channels but x has only D=8 channels"):
            ndrope.apply_rotary(torch.zeros(1, 4, 8), torch.zeros(4, 8))

    def test_token_count_mismatch(self):
        with pytest.raises(ValueError, match=r"the rotation is for 5 tokens but x has N=4 tokens"):
            ndrope.apply_rotary(torch.zeros(1, 4, 8), torch.zeros(5, 4))

    def test_mismatched_heads(self):
        with pytest.raises(ValueError, match=r"the rotation's leading dims \(3,\) do not broadcast against x's leading dims \(2, 4\)"):
            ndrope.apply_rotary(torch.zeros(2, 4, 5, 8), torch.zeros(3, 5, 4))

    def test_integer_x(self):
        with pytest.raises(TypeError, match="x must be a floating-point tensor, got dtype torch.int64"):
            ndrope.apply_rotary(torch.zeros(1, 4, 8, dtype=torch.long), torch.zeros(4, 4))

    def test_bad_cos_sin_pair(self):
        with pytest.raises(ValueError, match=r"cos \(4, 4\) and sin \(4, 3\) must have the same shape"):
            ndrope.apply_rotary(torch.zeros(1, 4, 8), (torch.zeros(4, 4), torch.zeros(4, 3)))
        with pytest.raises(TypeError, match="rotation must be a Tensor of angles or a \\(cos, sin\\) pair"):
            ndrope.apply_rotary(torch.zeros(1, 4, 8), 0.5)


class TestGridArguments:
    def test_bad_shapes(self):
        with pytest.raises(ValueError, match=r"shape=\(4, 0\) must contain only positive ints"):
            ndrope.grid((4, 0))
        with pytest.raises(TypeError, match=r"shape=\(\) must be a non-empty tuple"):
            ndrope.grid(())

    def test_reference_rank(self):
        with pytest.raises(ValueError, match=r"reference_shape=\(4,\) must have as many axes as shape=\(4, 4\)"):
            ndrope.grid((4, 4), reference_shape=(4,))


class TestModuleAndRotationArguments:
    """Resolution modes, positions, offsets and rotations given to RotaryEmbedding and apply_rotary."""

    def test_mode_is_checked_for_explicit_positions_too(self):
        rope = ndrope.RotaryEmbedding(16, 2, reference_shape=(2, 2))
        with pytest.raises(ValueError, match=r"mode='bicubic' is not supported"):
            rope.rotation(ndrope.grid((2, 2)), mode="bicubic")
        q = torch.zeros(1, 2, 4, 16)
        with pytest.raises(ValueError, match=r"mode='bicubic' is not supported"):
            rope(q, q, ndrope.grid((2, 2)), mode="bicubic")

    def test_rank_one_positions_in_forward(self):
        q = torch.zeros(1, 2, 5, 16)
        with pytest.raises(ValueError, match=r"positions must have rank >= 2, got shape \(5,\)"):
            ndrope.RotaryEmbedding(16, 2)(q, q, torch.zeros(5))

    @pytest.mark.parametrize("offset", ["a", True, (1.0, "b")])
    def test_grid_offset_that_is_not_a_number(self, offset):
        with pytest.raises((TypeError, ValueError), match="offset="):
            ndrope.grid((2, 2), offset=offset)

    def test_integer_angles_name_the_rotation(self):
        with pytest.raises(TypeError, match=r"(rotation|angles) must be a floating-point tensor, got dtype torch.int64"):
            ndrope.apply_rotary(torch.zeros(1, 4, 8), torch.zeros(4, 4, dtype=torch.long))

    def test_rotation_on_another_device(self):
        with pytest.raises(ValueError, match="the rotation is on meta but x is on cpu"):
            ndrope.apply_rotary(torch.zeros(1, 4, 8), torch.zeros(4, 4, device="meta"))


class TestCoreArguments:
    """Tables, devices and NTK scales: refused with the argument's name."""

    def test_integer_cos_sin_rejected(self):
        cos = torch.ones(4, 4, dtype=torch.int64)
        with pytest.raises(TypeError, match="cos must be a floating-point tensor, got dtype torch.int64"):
            ndrope.apply_rotary(torch.randn(1, 4, 8), (cos, torch.zeros(4, 4, dtype=torch.int64)))
        with pytest.raises(TypeError, match="sin must be a floating-point tensor"):
            ndrope.apply_rotary(torch.randn(1, 4, 8), (torch.ones(4, 4), torch.zeros(4, 4, dtype=torch.int32)))

    def test_angles_on_two_devices(self):
        with pytest.raises(ValueError, match="positions is on cpu but freqs is on meta"):
            ndrope.angles(torch.zeros(4, 2), ndrope.axial_frequencies(16, 2).to("meta"))

    @pytest.mark.parametrize("scale", [[float("nan"), 1.0], [1.0, float("inf")], [2.0], [2.0, 2.0, 2.0], [], [0.0, 1.0], None, "22"])
    def test_bad_ntk_scale(self, scale):
        freqs = ndrope.axial_frequencies(16, 2)
        with pytest.raises(ValueError, match=r"scale"):
            ndrope.ntk_scaled_frequencies(freqs, scale)

    def test_empty_ntk_freqs(self):
        """No axes is an error naming freqs; no pairs is no work (not an IndexError from deep inside)."""
        with pytest.raises(ValueError, match="freqs"):
            ndrope.ntk_scaled_frequencies(torch.zeros(0, 4, dtype=torch.float64), [])
        try:
            out = ndrope.ntk_scaled_frequencies(torch.zeros(2, 0, dtype=torch.float64), [2.0, 2.0])
        except ValueError as error:
            assert "freqs" in str(error)
        else:
            assert out.shape == (2, 0)

    def test_cos_and_sin_on_two_devices_names_sin(self):
        with pytest.raises(ValueError, match="sin is on meta but cos is on cpu"):
            ndrope.apply_rotary(torch.zeros(1, 4, 8), (torch.zeros(4, 4), torch.zeros(4, 4, device="meta")))
