"""Recipes as modules: `RotaryEmbedding.from_recipe` rotates exactly as the recipe (its attention scale and
coordinate law included), follows ``.to(device, dtype)``, adds nothing to the state dict for fixed frequencies;
`from_frequencies` refuses a recipe instead of dropping its attention scale; positions are float32 unless asked."""

from __future__ import annotations

import math

import pytest
import torch

import ndrope
from ndrope import recipes

F32 = torch.float32


def rotate(rotation, x, layout):
    return ndrope.apply_rotary(x, rotation, layout=layout)


def test_yarn_attention_scale_is_kept():
    recipe = recipes.yarn(32, factor=4.0, original_max_position_embeddings=16)
    assert recipe.attention_scale == pytest.approx(0.1 * math.log(4.0) + 1.0)  # 1.139
    rope = ndrope.RotaryEmbedding.from_recipe(recipe)
    positions = torch.arange(50.0)[:, None]
    cos, sin = rope.rotation(positions)
    expected = recipe.rotation(positions)
    torch.testing.assert_close(cos, expected[0], rtol=0, atol=1e-7)
    torch.testing.assert_close(sin, expected[1], rtol=0, atol=1e-7)
    assert float((cos.square() + sin.square()).sqrt().max()) == pytest.approx(recipe.attention_scale, rel=1e-6)
    assert rope.attention_scale == recipe.attention_scale and "attention_scale=1.13863" in repr(rope)


def test_from_frequencies_refuses_a_recipe_instead_of_dropping_its_scale():
    recipe = recipes.yarn(32, factor=4.0, original_max_position_embeddings=16)
    with pytest.raises(TypeError, match="from_recipe"):
        ndrope.RotaryEmbedding.from_frequencies(recipe)
    # the frequencies alone are accepted, and documented as keeping nothing else: no scale
    cos, sin = ndrope.RotaryEmbedding.from_frequencies(recipe.freqs).rotation(torch.arange(5.0)[:, None])
    torch.testing.assert_close(cos.square() + sin.square(), torch.ones_like(cos))


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: recipes.dinov3(16), (5, 7)),
        (lambda: recipes.dinov3(16, normalize="max", indexing="xy", grid_offset=0.5), (4, 6)),
        (lambda: recipes.timm_axial(16, ref_feat_shape=(8, 8), grid_offset=0.5), (5, 7)),
        (lambda: recipes.rope_axial(16), (3, 5)),
        (lambda: recipes.pixtral(16, theta=100.0), (5, 7)),
    ],
)
def test_grids_follow_the_recipes_coordinate_law(make, shape):
    recipe = make()
    rope = ndrope.RotaryEmbedding.from_recipe(recipe, reference_shape=shape)
    positions = recipe.positions(shape, dtype=torch.float64)
    x = torch.randn(2, 3, 2 + shape[0] * shape[1], 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = rotate(rope.rotation(shape, num_prefix_tokens=2), x, rope.layout)  # the cached reference table
    expected = rotate(recipe.rotation(positions, dtype=F32), x[..., 2:, :], recipe.layout)
    assert torch.equal(ours[..., :2, :], x[..., :2, :])  # prefix tokens unrotated
    torch.testing.assert_close(ours[..., 2:, :], expected, rtol=0, atol=1e-6)
    uncached = ndrope.RotaryEmbedding.from_recipe(recipe)
    torch.testing.assert_close(rotate(uncached.rotation(shape), x[..., 2:, :], rope.layout), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(rope.positions(shape), positions.float(), rtol=0, atol=0)


def test_interpolation_of_a_coordinate_law():
    index_law = ndrope.RotaryEmbedding.from_recipe(recipes.rope_axial(16), reference_shape=(4, 4))
    expected = recipes.timm_axial(16, theta=100.0, indexing="xy", ref_feat_shape=(4, 4)).positions((8, 6))
    torch.testing.assert_close(index_law.positions((8, 6), mode="interpolate"), expected, rtol=0, atol=0)
    for recipe in (recipes.dinov3(16), recipes.timm_axial(16, ref_feat_shape=(8, 8))):
        rope = ndrope.RotaryEmbedding.from_recipe(recipe, reference_shape=(4, 4))
        with pytest.raises(ValueError, match="mode='interpolate'"):
            rope.rotation((8, 6), mode="interpolate")


def test_fixed_frequencies_add_nothing_to_the_state_dict_and_learned_ones_train():
    assert ndrope.RotaryEmbedding.from_recipe(recipes.dinov3(16), reference_shape=(4, 4)).state_dict() == {}
    learned = ndrope.RotaryEmbedding.from_recipe(recipes.dinov3(16), learnable=True)
    assert learned.learnable and learned.freqs.dtype == F32 and list(learned.state_dict()) == ["freqs"]
    cos, _ = learned.rotation((3, 3))
    cos.sum().backward()
    assert learned.freqs.grad is not None and learned.freqs.grad.abs().sum() > 0


def test_tables_follow_to_device_and_dtype():
    recipe = recipes.yarn(32, factor=4.0, original_max_position_embeddings=16)
    rope = ndrope.RotaryEmbedding.from_recipe(recipe, reference_shape=(8,))
    assert rope.reference_cos.dtype == F32
    rope.double()  # float64 activations get float64 tables
    assert rope.rotation((8,), dtype=torch.float64)[0].dtype == torch.float64
    rope.to("cpu", torch.bfloat16)
    assert rope.frequencies().dtype == torch.float64  # the frequencies keep their precision
    cos, sin = rope.rotation((8,))
    assert cos.dtype == F32 and cos.device.type == "cpu"  # tables never below float32
    torch.testing.assert_close(cos, recipe.rotation(recipe.positions(8))[0], rtol=0, atol=1e-7)  # scale kept


def test_recipe_positions_and_tables_are_float32_unless_asked():
    recipe = recipes.standard(16)
    assert recipe.positions(8).dtype == F32 and recipe.rotation(recipe.positions(8))[0].dtype == F32
    assert recipes.dinov3(16).positions((2, 3)).dtype == F32
    assert recipes.Coordinates(kind="centered")((2, 3)).dtype == F32
    wide = recipe.positions(8, dtype=torch.float64)
    assert wide.dtype == torch.float64 and recipe.rotation(wide)[0].dtype == torch.float64


def test_from_recipe_names_a_bad_argument():
    with pytest.raises(TypeError, match="RopeRecipe"):
        ndrope.RotaryEmbedding.from_recipe(torch.zeros(1, 4))
