"""`ndrope.integrations.timm.patch` on timm's Eva family (EVA-02, naver RoPE-ViT and RoPE-Mixed, DINOv3), tiny
models built in code: outputs equal timm's to float32 rounding far below RoPE's own effect, gradients match, the
rotation runs as ``ndrope::rotate``, checkpoints load both ways, and RoPE-Mixed frequencies convert between
timm's layout and ndrope's."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from integration_parity import assert_gradients_match, assert_same_model, rotations
from recipe_parity import max_abs

import ndrope
from ndrope import recipes

timm = pytest.importorskip("timm", minversion="1.0.20")  # the first with naver RoPE-ViT and DINOv3 in Eva
from timm.layers import pos_embed_sincos  # noqa: E402
from timm.models import eva  # noqa: E402

from ndrope.integrations import timm as integration  # noqa: E402

SMALL = dict(embed_dim=64, depth=2, num_heads=4, num_classes=10)
# name: (timm model, its keywords)
MODELS = {
    "eva02_ref_feat_shape": ("eva02_tiny_patch14_224", dict(img_size=56)),
    "eva02_ref_feat_shape_other_grid": ("eva02_tiny_patch14_224", dict(img_size=56, dynamic_img_size=True)),
    "naver_rope_axial": ("vit_small_patch16_rope_224", dict(img_size=64)),
    "naver_rope_mixed": ("vit_small_patch16_rope_mixed_224", dict(img_size=64)),
    "rope_reg1_gap": ("vit_base_patch16_rope_reg1_gap_256", dict(img_size=64)),
    "dinov3": ("vit_small_patch16_dinov3", dict(img_size=64)),
    "naver_half_offset": ("vit_small_patch16_rope_224", dict(img_size=64, rope_rotate_half=True,
                                                                 rope_grid_offset=0.5)),
}
IMAGE = {"eva02_ref_feat_shape_other_grid": (70, 42)}  # 5 x 3 patches of 14 against the 4 x 4 reference
# timm < 1.0.30: RotaryEmbeddingCat has no rotate_half (Eva's rope_rotate_half then disagrees with its table)
HALF_CAT = "rotate_half" in inspect.signature(pos_embed_sincos.RotaryEmbeddingCat).parameters
# timm < 1.0.31: no rope coordinate augmentation
AUGMENTS = "rope_rescale_coords" in inspect.signature(eva.Eva).parameters


def build(name: str, **overrides):
    model_name, kwargs = MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, **{**SMALL, **kwargs, **overrides}).eval()
    with torch.no_grad():  # attention logits of order 1 (timm's 0.02 init leaves RoPE barely visible)
        generator = torch.Generator().manual_seed(0)
        for param_name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.2, generator=generator)
            elif "gamma" in param_name:  # layer scale, 1e-5 at init: would hide the attention branch
                param.fill_(1.0)
    return model


def image(name: str, batch: int = 2) -> torch.Tensor:
    size = IMAGE.get(name, (MODELS[name][1]["img_size"],) * 2)
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(MODELS))
def test_eva_family_keeps_outputs(name):
    if name == "naver_half_offset" and not HALF_CAT:
        pytest.skip("timm < 1.0.30: rope_rotate_half is not applied to timm's own table")
    original = build(name)
    patched = integration.patch(copy.deepcopy(original))
    assert isinstance(patched.rope, integration.TimmRotaryEmbedding)
    x = image(name)
    no_rope = copy.deepcopy(original)
    no_rope.rope = None
    with torch.no_grad():
        out, ours = original.forward_features(x), patched.forward_features(x)
        oracle = copy.deepcopy(patched).double().forward_features(x.double())
        removed = no_rope.forward_features(x)
    assert_same_model(f"timm:{name}", original=out, patched=ours, no_rope=removed, oracle=oracle)
    assert rotations(lambda: patched(x)) == 2 * SMALL["depth"] and rotations(lambda: original(x)) == 0


@pytest.mark.parametrize("name", ["eva02_ref_feat_shape", "naver_rope_mixed", "dinov3"])
def test_gradients_match_in_training(name):
    original = build(name).train()
    patched = integration.patch(copy.deepcopy(original))
    x = image(name)
    for model in (original, patched):
        model(x).square().mean().backward()
    assert_gradients_match(original, patched, skip=frozenset({"rope.freqs"}))
    if name == "naver_rope_mixed":  # the learned frequencies train, with timm's gradient in ndrope's layout
        ours = integration.mixed_freqs_to_timm(patched.rope.rope.freqs.grad, depth=SMALL["depth"])
        assert max_abs(ours, original.rope.freqs.grad) <= 1e-3 * float(original.rope.freqs.grad.abs().max())


def test_set_input_size_moves_the_grid_as_timm_does():
    original = build("eva02_ref_feat_shape")
    patched = integration.patch(copy.deepcopy(original))
    for model in (original, patched):
        model.set_input_size(img_size=(70, 42))
    x = torch.randn(1, 3, 70, 42)
    with torch.no_grad():
        assert max_abs(patched.forward_features(x), original.forward_features(x)) <= 1e-4


@pytest.mark.skipif(not AUGMENTS, reason="timm < 1.0.31 has no RoPE coordinate augmentation")
def test_coordinate_augmentation_in_training():
    original = build("dinov3", rope_rescale_coords=2.0, rope_shift_coords=0.1).train()
    patched = integration.patch(copy.deepcopy(original))
    assert (patched.rope.shift, patched.rope.rescale) == (0.1, 2.0)
    x = image("dinov3")
    with torch.no_grad():
        assert max_abs(patched(x), patched(x)) > 0  # one draw per forward
        patched.eval()
        assert max_abs(patched.forward_features(x), original.eval().forward_features(x)) <= 1e-4  # off in eval


def test_only_the_patched_instance_changes():
    original = build("naver_rope_axial")
    other = copy.deepcopy(original)
    x = image("naver_rope_axial")
    with torch.no_grad():
        before = other(x)
    integration.patch(original)
    assert eva.apply_rot_embed_cat is pos_embed_sincos.apply_rot_embed_cat
    assert "forward" not in vars(other.blocks[0].attn)
    with torch.no_grad():
        assert torch.equal(other(x), before)
    assert rotations(lambda: other(x)) == 0


# --------------------------------------------------------------------------------------------------------------
# RoPE-Mixed: checkpoints and layouts
# --------------------------------------------------------------------------------------------------------------


def test_rope_mixed_checkpoints_load_both_ways():
    original = build("naver_rope_mixed")
    patched = integration.patch(build("naver_rope_mixed"))
    state = patched.state_dict()
    assert state.keys() == original.state_dict().keys() and state["rope.freqs"].shape == original.rope.freqs.shape
    with torch.no_grad():
        original.rope.freqs.mul_(1.5)  # a "trained" timm checkpoint
    patched.load_state_dict(original.state_dict())
    x = image("naver_rope_mixed")
    with torch.no_grad():
        assert max_abs(patched.forward_features(x), original.forward_features(x)) <= 1e-4
        fresh = build("naver_rope_mixed")
        fresh.load_state_dict(patched.state_dict())  # and the patched model's checkpoint into timm
        assert torch.equal(fresh.rope.freqs, original.rope.freqs)


@pytest.mark.parametrize("indexing", ["xy", "ij"])
def test_rope_mixed_frequencies_convert_between_timm_and_ndrope(indexing):
    """timm's (2, depth, H, P) frequencies, converted, rotate ndrope.grid (row, column) positions exactly as timm's
    own table does; and the conversion round-trips (state dicts too)."""
    depth, heads, head_dim, shape = 2, 3, 16, (4, 6)
    torch.manual_seed(0)
    module = pos_embed_sincos.RotaryEmbeddingMixed(heads * head_dim, depth, heads, grid_indexing=indexing)
    ours = integration.mixed_freqs_to_ndrope(module.freqs.detach(), grid_indexing=indexing)  # (depth * H, 2, P)
    assert ours.shape == (depth * heads, 2, head_dim // 2)
    cos, sin = ndrope.RotaryEmbedding.from_frequencies(ours, layout="interleaved").rotation(shape)
    theirs = module.get_embed(list(shape)).detach()  # (depth, H, N, 2 * head_dim): sin, cos
    their_sin, their_cos = theirs.chunk(2, dim=-1)
    assert max_abs(cos.unflatten(0, (depth, heads)), their_cos[..., 0::2]) <= 1e-5
    assert max_abs(sin.unflatten(0, (depth, heads)), their_sin[..., 0::2]) <= 1e-5
    back = integration.mixed_freqs_to_timm(ours, depth=depth, grid_indexing=indexing)
    assert torch.equal(back, module.freqs.detach())
    state = {"rope.freqs": module.freqs.detach(), "head.weight": torch.ones(2)}
    there = integration.convert_mixed_state_dict(state, to="ndrope", depth=depth, grid_indexing=indexing)
    again = integration.convert_mixed_state_dict(there, to="timm", depth=depth, grid_indexing=indexing)
    assert torch.equal(again["rope.freqs"], state["rope.freqs"]) and again["head.weight"] is state["head.weight"]


# --------------------------------------------------------------------------------------------------------------
# other schemes
# --------------------------------------------------------------------------------------------------------------


def test_dinov3_scheme_in_a_naver_model():
    model = integration.patch(build("naver_rope_axial"), recipe=recipes.dinov3(16, rotate_half=False))
    x = torch.randn(1, 3, 64, 96)  # another grid than the 4 x 4 training grid: DINOv3's coordinates stay in [-1, 1]
    model.set_input_size(img_size=(64, 96))
    assert model(x).shape == (1, 10)
    positions = model.rope.rope.positions((4, 6))
    assert float(positions.abs().max()) < 1


def test_learned_rope_mixed_in_eva02_trains_and_keeps_timm_keys():
    original = build("eva02_ref_feat_shape")
    mixed = ndrope.RotaryEmbedding.mixed(16, 2, num_heads=4, layout="interleaved")
    patched = integration.patch(copy.deepcopy(original), recipe=mixed)
    patched.train()(image("eva02_ref_feat_shape")).square().mean().backward()
    assert patched.rope.rope.freqs.grad.abs().sum() > 0
    assert set(patched.state_dict()) - set(original.state_dict()) == {"rope.rope.freqs"}


# --------------------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------------------


def test_a_model_without_rope_names_itself_and_what_is_supported():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    with pytest.raises(ValueError, match=r"VisionTransformer has no RoPE module.*EVA-02"):
        integration.patch(model)


def test_an_unknown_rope_module_is_named():
    model = build("naver_rope_axial")
    model.rope = pos_embed_sincos.RotaryEmbedding(16, in_pixels=False)
    with pytest.raises(ValueError, match="RotaryEmbedding, which patch does not know"):
        integration.patch(model)


def test_a_configuration_timm_applies_inconsistently_is_refused():
    """Each attention applies timm's table with its own rotate_half: one that disagrees with the table is a rotation
    ndrope's recipe does not describe, so patch refuses (as old timm releases built such models)."""
    model = build("naver_rope_axial")
    for block in model.blocks:
        block.attn.rotate_half = True  # the table is interleaved
    with pytest.raises(ValueError, match="rotate_half may disagree"):
        integration.patch(model)
    assert not isinstance(model.rope, integration.TimmRotaryEmbedding)


def test_patching_twice_is_a_clear_error():
    model = integration.patch(build("naver_rope_axial"))
    with pytest.raises(ValueError, match="already patched"):
        integration.patch(model)


@pytest.mark.parametrize(
    "recipe, match",
    [
        (recipes.mrope(16, (2, 3, 3)), "n_axes=3"),
        (recipes.timm_axial(64), "a head has only 8"),
        (ndrope.RotaryEmbedding.mixed(16, 2, num_heads=3), "frequencies for 3 heads"),
        ("dinov3", "RopeRecipe or ndrope.RotaryEmbedding"),
    ],
)
def test_a_scheme_that_does_not_fit_is_refused_before_anything_changes(recipe, match):
    model = build("naver_rope_axial")
    rope = model.rope
    with pytest.raises((ValueError, TypeError), match=match):
        integration.patch(model, recipe=recipe)
    assert model.rope is rope and "forward" not in vars(model.blocks[0].attn)
