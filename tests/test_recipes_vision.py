"""Vision recipes against timm 1.0.31 (``timm/layers/pos_embed_sincos.py``) and rotary-embedding-torch.

Per case: the peer's float32 frequencies equal ours to float32 rounding; with the peer's frequencies the float64
rotations agree to 1e-12 (grids chosen so the peer's float32 coordinates are exact); end to end in float32
against our float64 oracle, our error is no larger than the peer's own.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from recipe_parity import F32_FREQ_RTOL, F64_TOL, assert_no_worse_than_peer, max_abs, max_rel, report

import ndrope
from ndrope import recipes

timm_sincos = pytest.importorskip("timm.layers.pos_embed_sincos")
ret = pytest.importorskip("rotary_embedding_torch")

HEAD_DIM = 16
F64 = torch.float64  # the oracle's positions (recipes give float32 unless asked)
TIMM_VERSION = tuple(int(p) for p in pytest.importorskip("timm").__version__.split(".")[:3])


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def ours_rotate(recipe, x, positions, dtype=None):
    return ndrope.apply_rotary(x, recipe.rotation(positions, dtype=dtype), layout=recipe.layout)


def timm_rotate(x, emb, half):
    return timm_sincos.apply_rot_embed_cat(x, emb, half=half)


# name: (timm RotaryEmbeddingCat kwargs, our recipe, exact-in-float32 grid, general grid)
TIMM_AXIAL = {
    "eva02_ref_feat_shape": (
        dict(in_pixels=False, temperature=10000, ref_feat_shape=[8, 16]),
        lambda: recipes.timm_axial(HEAD_DIM, ref_feat_shape=(8, 16)), (4, 8), (5, 7),
    ),
    "timm_xy_offset_half": (
        dict(in_pixels=False, temperature=1000, grid_indexing="xy", grid_offset=0.5, rotate_half=True),
        lambda: recipes.timm_axial(HEAD_DIM, theta=1000, indexing="xy", grid_offset=0.5, rotate_half=True),
        (3, 5), (6, 9),
    ),
    "rope_axial_naver": (
        dict(in_pixels=False, temperature=100, grid_indexing="xy"),
        lambda: recipes.rope_axial(HEAD_DIM), (3, 5), (7, 6),
    ),
    "timm_pixel_log_bands": (
        dict(in_pixels=True, max_res=64), lambda: recipes.timm_axial(HEAD_DIM, in_pixels=True, max_res=64),
        (5, 9), (6, 7),
    ),
    "timm_pixel_linear_bands_ref": (
        dict(in_pixels=True, max_res=32, linear_bands=True, ref_feat_shape=[10, 18]),
        lambda: recipes.timm_axial(HEAD_DIM, in_pixels=True, max_res=32, linear_bands=True, ref_feat_shape=(10, 18)),
        (5, 9), (4, 7),
    ),
}


@pytest.mark.parametrize("name", list(TIMM_AXIAL))
def test_timm_axial_recipes_match_timm(name):
    kwargs, make, exact_shape, shape = TIMM_AXIAL[name]
    if "rotate_half" in kwargs and "rotate_half" not in inspect.signature(timm_sincos.RotaryEmbeddingCat).parameters:
        pytest.skip("timm < 1.0.30: RotaryEmbeddingCat has no rotate_half (half layout)")
    recipe = make()
    half = kwargs.get("rotate_half", False)
    module = timm_sincos.RotaryEmbeddingCat(HEAD_DIM, **kwargs)
    bands = module.bands.double()
    same = dataclasses.replace(recipe, freqs=torch.block_diag(bands[None], bands[None]))
    freq_rel = max_rel(recipe.freqs, same.freqs)
    assert freq_rel <= F32_FREQ_RTOL

    # float64 with timm's bands: timm's own builder (float64 output) and apply_rot_embed_cat
    build = {k: v for k, v in kwargs.items() if k not in ("temperature", "max_res", "linear_bands")}
    sin, cos = timm_sincos.build_rotary_pos_embed(list(exact_shape), bands=bands, dtype=torch.float64, **build)
    x = rand(2, 3, exact_shape[0] * exact_shape[1], HEAD_DIM)
    theirs = timm_sincos.apply_rot_embed(x, sin, cos, half=half)
    f64 = max_abs(ours_rotate(same, x, same.positions(exact_shape, dtype=F64)), theirs)
    assert f64 <= F64_TOL, f"{name}: float64 rotation differs by {f64:.2e}"

    # float32 end to end on a grid whose rescaled coordinates are not exact in float32
    x = rand(2, 3, shape[0] * shape[1], HEAD_DIM, seed=1)
    oracle = ours_rotate(recipe, x, recipe.positions(shape, dtype=F64))
    peer32 = timm_rotate(x.float(), module.get_embed(list(shape)), half)
    ours32 = ours_rotate(recipe, x.float(), recipe.positions(shape, dtype=F64), dtype=torch.float32)  # float64 coords in
    err_ours, err_peer = max_abs(ours32, oracle), max_abs(peer32, oracle)
    assert_no_worse_than_peer(name, err_ours, err_peer, x, 1e-4)
    report(name, freq_rel=freq_rel, f64_abs=f64, f32_ndrope=err_ours, f32_timm=err_peer)


@pytest.mark.parametrize("indexing", ["xy", "ij"])
def test_rope_mixed_matches_timm(indexing):
    depth, heads, dim = 2, 3, 3 * HEAD_DIM
    torch.manual_seed(7)
    module = timm_sincos.RotaryEmbeddingMixed(dim, depth, heads, temperature=10.0, grid_indexing=indexing)
    # the init law, in float64 (timm's init_random_2d_freqs takes a dtype) from the same random stream
    torch.manual_seed(3)
    theirs_init = timm_sincos.init_random_2d_freqs(HEAD_DIM, depth, heads, temperature=10.0, dtype=torch.float64)
    ours_init = recipes.rope_mixed_init(HEAD_DIM, heads, depth=depth, theta=10.0,
                                        generator=torch.Generator().manual_seed(3))
    init_err = max_abs(ours_init, theirs_init)
    assert init_err <= F64_TOL
    # the coordinates: timm's own grid
    shape = (5, 7)
    t_x, t_y = timm_sincos.get_mixed_grid(list(shape), grid_indexing=indexing)
    recipe = recipes.rope_mixed(module.freqs[:, 1], indexing=indexing)
    assert torch.equal(recipe.positions(shape, dtype=F64), torch.stack([t_x, t_y], -1).double())
    # float32 end to end (timm computes RoPE-Mixed angles in float32 only) for block 1
    x = rand(2, heads, shape[0] * shape[1], HEAD_DIM)
    oracle = ours_rotate(recipe, x, recipe.positions(shape, dtype=F64))
    peer32 = timm_rotate(x.float(), module.get_embed(list(shape))[1].detach(), False)
    ours32 = ours_rotate(recipe, x.float(), recipe.positions(shape, dtype=F64), dtype=torch.float32)  # float64 coords in
    err_ours, err_peer = max_abs(ours32, oracle), max_abs(peer32, oracle)
    assert_no_worse_than_peer(indexing, err_ours, err_peer, x, 1e-4)
    report(f"rope_mixed_{indexing}", init_f64_abs=init_err, f32_ndrope=err_ours, f32_timm=err_peer)


# name: (RotaryEmbeddingDinoV3 kwargs, our recipe, exact grid, general grid)
DINOV3 = {
    "dinov3_separate": (dict(temperature=100.0), lambda: recipes.dinov3(HEAD_DIM), (4, 8), (5, 7)),
    "dinov3_max_periods_xy": (
        # min/max periods win over temperature in timm and in the recipe (timm < 1.0.31 needs a temperature)
        dict(temperature=100.0, min_period=0.5, max_period=40.0, normalize_coords="max", grid_indexing="xy"),
        lambda: recipes.dinov3(HEAD_DIM, theta=None, min_period=0.5, max_period=40.0, normalize="max", indexing="xy"),
        (4, 8), (6, 5),
    ),
    "dinov3_min_offset_interleaved": (
        dict(temperature=100.0, normalize_coords="min", grid_offset=0.5, rotate_half=False),
        lambda: recipes.dinov3(HEAD_DIM, normalize="min", grid_offset=0.5, rotate_half=False), (4, 8), (3, 7),
    ),
}


@pytest.mark.parametrize("name", list(DINOV3))
def test_dinov3_matches_timm(name):
    kwargs, make, exact_shape, shape = DINOV3[name]
    if kwargs.get("grid_indexing") == "xy" and TIMM_VERSION < (1, 0, 31):
        pytest.skip("timm < 1.0.31: RotaryEmbeddingDinoV3(grid_indexing='xy') kept (h, w) coordinates")
    recipe = make()
    half = kwargs.get("rotate_half", True)
    module32 = timm_sincos.RotaryEmbeddingDinoV3(HEAD_DIM, **kwargs)
    module64 = timm_sincos.RotaryEmbeddingDinoV3(HEAD_DIM, dtype=torch.float64, **kwargs)
    band = 2 * torch.pi / module64.periods
    same = dataclasses.replace(recipe, freqs=torch.block_diag(band[None], band[None]))
    freq_rel = max_rel(recipe.freqs, same.freqs)
    assert freq_rel <= F32_FREQ_RTOL
    n = exact_shape[0] * exact_shape[1]
    x = rand(2, 3, n, HEAD_DIM)
    f64 = max_abs(ours_rotate(same, x, same.positions(exact_shape, dtype=F64)),
                  timm_rotate(x, module64.get_embed(list(exact_shape)), half))
    assert f64 <= F64_TOL, f"{name}: float64 rotation differs by {f64:.2e}"
    # the coordinates themselves against timm's helper
    coords = timm_sincos.make_coords_dinov3(*shape, normalize_coords=kwargs.get("normalize_coords", "separate"),
                                            grid_indexing=kwargs.get("grid_indexing", "ij"),
                                            grid_offset=kwargs.get("grid_offset", 0.0))
    assert max_rel(recipe.positions(shape), coords) <= 1e-6  # timm normalises in float32
    x = rand(2, 3, shape[0] * shape[1], HEAD_DIM, seed=1)
    oracle = ours_rotate(recipe, x, recipe.positions(shape, dtype=F64))
    peer32 = timm_rotate(x.float(), module32.get_embed(list(shape)), half)
    ours32 = ours_rotate(recipe, x.float(), recipe.positions(shape, dtype=F64), dtype=torch.float32)  # float64 coords in
    err_ours, err_peer = max_abs(ours32, oracle), max_abs(peer32, oracle)
    assert_no_worse_than_peer(name, err_ours, err_peer, x, 1e-4)
    report(name, freq_rel=freq_rel, f64_abs=f64, f32_ndrope=err_ours, f32_timm=err_peer)


def test_pixtral_matches_transformers():
    """Pixtral interleaves one ladder between the axes (even rungs to rows, odd rungs to columns): the recipe
    equals transformers' ``PixtralVisionRotaryEmbedding``; an axial RoPE with a ladder per axis does not."""
    modeling = pytest.importorskip("transformers.models.pixtral.modeling_pixtral")
    from transformers import PixtralVisionConfig

    theta = 500.0
    config = PixtralVisionConfig(hidden_size=4 * HEAD_DIM, num_attention_heads=4, rope_parameters={
        "rope_type": "axial", "rope_theta": theta})
    module = modeling.PixtralVisionRotaryEmbedding(config)
    recipe = recipes.pixtral(HEAD_DIM, theta=theta)
    quarter = HEAD_DIM // 4
    band = module.inv_freq.double()
    same = dataclasses.replace(recipe, freqs=torch.block_diag(band[None, :quarter], band[None, quarter:]))
    freq_rel = max_rel(recipe.freqs, same.freqs)
    assert freq_rel <= F32_FREQ_RTOL
    shape = (5, 7)
    position_ids = recipe.positions(shape, dtype=torch.long)  # what PixtralVisionModel passes: (row, column)
    x = rand(2, 3, shape[0] * shape[1], HEAD_DIM)

    def peer(x, cos, sin):
        return modeling.apply_rotary_pos_emb(x, x, cos, sin, unsqueeze_dim=0)[0]

    # float64: transformers' own recomposition of its frequencies
    phase = position_ids[..., None].double() * band
    theirs = peer(x, module.recomposition_frequencies(phase.cos()), module.recomposition_frequencies(phase.sin()))
    f64 = max_abs(ours_rotate(same, x, same.positions(shape, dtype=F64)), theirs)
    assert f64 <= F64_TOL, f"pixtral: float64 rotation differs by {f64:.2e}"
    oracle = ours_rotate(recipe, x, recipe.positions(shape, dtype=F64))
    peer32 = peer(x.float(), *module(x.float(), position_ids))
    ours32 = ours_rotate(recipe, x.float(), recipe.positions(shape))
    err_ours, err_peer = max_abs(ours32, oracle), max_abs(peer32, oracle)
    assert_no_worse_than_peer("pixtral", err_ours, err_peer, x, 1e-4)
    naive = ndrope.RotaryEmbedding(HEAD_DIM, 2, theta=theta)  # a ladder per axis: not Pixtral's
    naive_err = max_abs(ndrope.apply_rotary(x, naive.rotation(shape)), oracle)
    assert naive_err > 1e4 * max(err_ours, err_peer), naive_err
    report("pixtral", freq_rel=freq_rel, f64_abs=f64, f32_ndrope=err_ours, f32_transformers=err_peer,
           axial_per_axis_ladder=naive_err)


def test_dinov3_augmentation_goes_through_augment_positions():
    recipe = recipes.dinov3(HEAD_DIM)
    base = recipe.positions((4, 6))
    shifted = recipe.positions((4, 6), shift=0.3, generator=torch.Generator().manual_seed(0))
    offset = shifted - base  # a shift alone moves every patch by one per-axis constant
    assert torch.allclose(offset, offset[:1].expand_as(offset), atol=1e-6)
    assert (offset[0].abs() <= 0.3).all() and (offset[0] != 0).any()
    gen = torch.Generator().manual_seed(5)
    expected = ndrope.augment_positions(base, jitter=1.5, rescale=2.0, generator=gen)
    got = recipe.positions((4, 6), jitter=1.5, rescale=2.0, generator=torch.Generator().manual_seed(5))
    assert max_abs(got, expected) <= 1e-6


# name: (RotaryEmbedding kwargs, our recipe, grid or sequence length)
RET = {
    "ret_lang_1d_rescaled": (dict(dim=HEAD_DIM, theta=100, theta_rescale_factor=2.0, interpolate_factor=2.0),
                             lambda: recipes.rotary_embedding_torch(HEAD_DIM, theta=100, theta_rescale_factor=2.0,
                                                                     interpolate_factor=2.0), (40,)),
    "ret_pixel_1d": (dict(dim=HEAD_DIM, freqs_for="pixel", max_freq=6.0),
                     lambda: recipes.rotary_embedding_torch(HEAD_DIM, freqs_for="pixel", max_freq=6.0), (12,)),
    "ret_lang_axial": (dict(dim=8), lambda: recipes.rotary_embedding_torch(8, 2), (3, 5)),
    "ret_pixel_axial_3d": (dict(dim=6, freqs_for="pixel", max_freq=8.0),
                           lambda: recipes.rotary_embedding_torch(6, 3, freqs_for="pixel", max_freq=8.0), (3, 5, 9)),
}


@pytest.mark.parametrize("name", list(RET))
def test_rotary_embedding_torch_matches(name):
    kwargs, make, shape = RET[name]
    recipe = make()
    module = ret.RotaryEmbedding(**kwargs)
    band = module.freqs.detach().double()
    if len(shape) == 1:
        band = band / kwargs.get("interpolate_factor", 1.0)
    same = dataclasses.replace(recipe, freqs=torch.block_diag(*[band[None]] * len(shape)))
    freq_rel = max_rel(recipe.freqs, same.freqs)
    assert freq_rel <= F32_FREQ_RTOL
    n = int(torch.tensor(shape).prod())
    rotary_dim = 2 * recipe.freqs.shape[-1]
    x = rand(2, 3, n, rotary_dim + 2)  # two channels pass through

    def peer(module, x):
        if len(shape) == 1:
            return module.rotate_queries_or_keys(x)
        angles = module.get_axial_freqs(*shape).reshape(n, -1)
        return ret.apply_rotary_emb(angles, x)

    f64 = max_abs(ours_rotate(same, x, same.positions(shape, dtype=F64)), peer(ret.RotaryEmbedding(**kwargs).double(), x))
    assert f64 <= F64_TOL, f"{name}: float64 rotation differs by {f64:.2e}"
    oracle = ours_rotate(recipe, x, recipe.positions(shape, dtype=F64))
    peer32 = peer(module, x.float())
    ours32 = ours_rotate(recipe, x.float(), recipe.positions(shape, dtype=F64), dtype=torch.float32)  # float64 coords in
    err_ours, err_peer = max_abs(ours32, oracle), max_abs(peer32, oracle)
    assert_no_worse_than_peer(name, err_ours, err_peer, x, 1e-4)
    report(name, freq_rel=freq_rel, f64_abs=f64, f32_ndrope=err_ours, f32_rotary_embedding_torch=err_peer)


def test_coordinates_law():
    c = recipes.Coordinates(kind="index", reference_shape=(4, 4), offset=1.0)
    assert c((2, 2)).tolist() == [[2.0, 2.0], [2.0, 4.0], [4.0, 2.0], [4.0, 4.0]]  # (i + offset) * ref / size
    xy = recipes.Coordinates(indexing="xy")((2, 3))
    assert xy[:, 0].tolist() == [0, 1, 2, 0, 1, 2] and xy[:, 1].tolist() == [0, 0, 0, 1, 1, 1]
    assert recipes.Coordinates(kind="centered", normalize="max")((2, 4))[:, 0].unique().tolist() == [-0.75, -0.25]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: recipes.timm_axial(14, 2), "divisible"),
        (lambda: recipes.dinov3(16, theta=None), "min_period"),
        (lambda: recipes.rope_mixed(torch.zeros(3, 2, 4)), r"\(2, H, P\)"),
        (lambda: recipes.rotary_embedding_torch(8, freqs_for="constant"), "freqs_for"),
        (lambda: recipes.Coordinates(kind="grid"), "kind"),
        (lambda: recipes.dinov3(16).positions((2, 2, 2)), "n_axes"),
        (lambda: recipes.Coordinates(indexing="yx"), "indexing"),
    ],
)
def test_bad_arguments_name_themselves(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "make",
    [
        lambda: recipes.dinov3(HEAD_DIM),
        lambda: recipes.timm_axial(HEAD_DIM, ref_feat_shape=(8, 8)),
        lambda: recipes.rope_mixed(recipes.rope_mixed_init(HEAD_DIM, 3)[:, 0]),
    ],
)
def test_recipe_plugs_into_rotary_embedding(make):
    """The module route (what a ViT holds): ``RotaryEmbedding.from_frequencies`` with the recipe's F and layout,
    fed the recipe's coordinates, rotates exactly as the recipe's rotation at the activations' precision (float64
    here) does; prefix tokens stay unrotated."""
    recipe = make()
    rope = ndrope.RotaryEmbedding.from_frequencies(recipe.freqs, layout=recipe.layout)
    positions = recipe.positions((5, 7))
    q = rand(2, 3, 1 + 35, HEAD_DIM)
    k = rand(2, 3, 1 + 35, HEAD_DIM, seed=1)
    q_rot, k_rot = rope(q, k, positions)
    assert torch.equal(q_rot[..., 0, :], q[..., 0, :])
    assert q.dtype == torch.float64
    assert max_abs(q_rot[..., 1:, :], ours_rotate(recipe, q[..., 1:, :], positions, dtype=q.dtype)) <= F64_TOL
    assert max_abs(k_rot[..., 1:, :], ours_rotate(recipe, k[..., 1:, :], positions, dtype=q.dtype)) <= F64_TOL
