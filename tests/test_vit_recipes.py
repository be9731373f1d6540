"""`vit` models built on `ndrope.recipes` vision schemes (``rope_recipe``, by name): frequencies and coordinate law."""

from __future__ import annotations

import pytest
import torch
from jsonargparse import ArgumentParser

import vit
from ndrope import recipes

SMALL = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=3)


def expected_table(recipe: recipes.RopeRecipe, grid_shape: tuple[int, ...], prefix: int) -> tuple[torch.Tensor, ...]:
    """The recipe's own rotation for the grid, with identity rows for the prefix tokens."""
    cos, sin = recipe.rotation(recipe.positions(grid_shape), dtype=torch.float32)
    ones, zeros = torch.ones(prefix, cos.shape[-1]), torch.zeros(prefix, cos.shape[-1])
    return torch.cat((ones, cos)), torch.cat((zeros, sin))


@pytest.mark.parametrize("name", ["dinov3", "rope_axial", "timm_axial", "rotary_embedding_torch"])
@pytest.mark.parametrize("grid_shape", [(8, 8), (5, 11)])
def test_axial_model_rotates_by_the_recipe_at_every_grid(name, grid_shape):
    model = vit.NDRopeVisionTransformer("rope_axial", rope_recipe=name, **SMALL)
    head_dim = SMALL["embed_dim"] // SMALL["num_heads"]
    builders = {
        "timm_axial": lambda: recipes.timm_axial(head_dim, n_axes=2),
        "rotary_embedding_torch": lambda: recipes.rotary_embedding_torch(head_dim // 2, n_axes=2),
    }
    recipe = builders.get(name, lambda: getattr(recipes, name)(head_dim))()
    tables = model.rotary_tables(grid_shape)
    expected = expected_table(recipe, grid_shape, model.num_prefix_tokens)
    for table in tables:
        for got, want in zip(table, expected):
            torch.testing.assert_close(got, want, atol=2e-6, rtol=0)


def test_the_recipe_decides_the_coordinates_so_no_resolution_mode_applies():
    """A recipe positions every grid by its own law: a resolution mode would change nothing, so it is refused."""
    model = vit.NDRopeVisionTransformer("rope_axial", rope_recipe="dinov3", **SMALL)
    assert model.rope_resolution_mode is None and not model.rope_plan.per_block
    for mode in ("extrapolate", "interpolate", "ntk"):
        with pytest.raises(ValueError, match=rf"rope_resolution_mode='{mode}' does not apply.*rope_recipe='dinov3'"):
            model.set_resolution_mode(mode)
    with pytest.raises(ValueError, match="rope_resolution_mode='interpolate' does not apply"):
        vit.NDRopeVisionTransformer("rope_mixed", rope_recipe="dinov3", rope_resolution_mode="interpolate", **SMALL)


def test_mixed_model_learns_one_copy_of_the_recipe_per_layer():
    model = vit.NDRopeVisionTransformer("rope_mixed", rope_recipe="dinov3", **SMALL)
    recipe = recipes.dinov3(32)
    assert model.rope.learnable and model.rope.freqs.shape == (SMALL["depth"] * SMALL["num_heads"], 2, 16)
    torch.testing.assert_close(model.rope.freqs, recipe.freqs.float().expand_as(model.rope.freqs), atol=0, rtol=0)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.rope.freqs.grad is not None and model.rope.freqs.grad.abs().sum() > 0


def test_training_augments_the_recipe_coordinates_and_evaluation_does_not():
    model = vit.NDRopeVisionTransformer("rope_axial", rope_recipe="dinov3", rope_jitter=1.5, rope_shift=0.2, **SMALL)
    torch.manual_seed(0)
    first, second = (model.train().rotary_tables((8, 8))[0][1] for _ in range(2))
    assert not torch.allclose(first, second)
    evaluated = model.eval().rotary_tables((8, 8))[0]
    for got, want in zip(evaluated, expected_table(recipes.dinov3(32), (8, 8), model.num_prefix_tokens)):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=0)


def test_yaml_names_a_recipe():
    parser = ArgumentParser()
    parser.add_class_arguments(vit.NDRopeVisionTransformer, "net")
    args = [f"--net.{key}={value}" for key, value in SMALL.items()] + ["--net.pos_embed=rope_axial", "--net.rope_recipe=dinov3"]
    model = parser.instantiate(parser.parse_args(args)).net
    assert model.rope_plan.coordinates == recipes.dinov3(32).coordinates


class TestErrors:
    def test_needs_a_rope_encoding(self):
        with pytest.raises(ValueError, match="rope_recipe needs a RoPE pos_embed.*pos_embed='learned'"):
            vit.NDRopeVisionTransformer("learned", rope_recipe="dinov3", **SMALL)

    def test_unknown_name(self):
        with pytest.raises(ValueError, match=r"rope_recipe='dino' is not supported; choose one of \['dinov3'"):
            vit.NDRopeVisionTransformer("rope_axial", rope_recipe="dino", **SMALL)

    def test_frequencies_must_fit_the_model(self):
        video = dict(SMALL, img_size=(4, 32, 32), patch_size=(2, 4, 4), ndim=3)
        with pytest.raises(ValueError, match=r"rope_recipe='dinov3' has frequencies \(2, 16\) that do not fit this model.*A = ndim = 3"):
            vit.NDRopeVisionTransformer("rope_axial", rope_recipe="dinov3", **video)

    def test_only_names_are_accepted(self):
        with pytest.raises(TypeError, match=r"rope_recipe takes a name, one of \['dinov3', .*got a RopeRecipe"):
            vit.NDRopeVisionTransformer("rope_axial", rope_recipe=recipes.dinov3(32), **SMALL)

    def test_theta_and_recipe_are_exclusive(self):
        with pytest.raises(ValueError, match="rope_theta=10.0 and rope_recipe='dinov3' both set the frequencies"):
            vit.NDRopeVisionTransformer("rope_axial", rope_recipe="dinov3", rope_theta=10.0, **SMALL)
