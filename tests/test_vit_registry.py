"""Every registered timm name builds, runs forward and backward, and takes timm keywords."""

from __future__ import annotations

import pytest
import timm
import torch

import vit

param = pytest.mark.parametrize
SMALL = dict(embed_dim=48, depth=1, num_heads=3)


def test_names_are_registered_with_timm():
    assert set(timm.list_models("ndrope_vit_*")) == set(vit.MODEL_NAMES)
    sizes, patches = ("tiny", "small", "base"), ("patch16_224", "patch4_32")
    assert {f"ndrope_vit_{size}_{patch}" for size in sizes for patch in patches} == set(vit.MODEL_NAMES)


@param("name", vit.MODEL_NAMES)
def test_create_forward_backward(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, pos_embed="rope_axial", **SMALL)
    assert isinstance(model, vit.NDRopeVisionTransformer) and model.pos_embed_type == "rope_axial"
    channels, height, width = model.pretrained_cfg["input_size"]
    out = model(torch.randn(2, channels, height, width))
    assert out.shape == (2, model.pretrained_cfg["num_classes"]) and torch.isfinite(out).all()
    out.square().sum().backward()
    for param_name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, f"{name}: {param_name} got no gradient"


def test_architectures_match_their_names():
    for size, (width, heads) in {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}.items():
        model = timm.create_model(f"ndrope_vit_{size}_patch4_32", depth=1)
        assert model.embed_dim == width and model.num_heads == heads and model.patch_embed.patch_size == (4, 4)
    assert len(timm.create_model("ndrope_vit_tiny_patch16_224").blocks) == 12


def test_defaults_and_timm_keywords():
    model = timm.create_model("ndrope_vit_tiny_patch4_32", num_classes=100, global_pool="avg", reg_tokens=4, **SMALL)
    assert model.pos_embed_type == vit.DEFAULT_POS_EMBED
    assert model.num_classes == 100 and model.global_pool == "avg" and model.num_prefix_tokens == 5
    assert model.pretrained_cfg["mean"] == vit.registry.CIFAR10_MEAN
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 100)


def test_pretrained_weights_are_refused():
    with pytest.raises(ValueError, match="pretrained=True.*'ndrope_vit_small_patch16_224'"):
        timm.create_model("ndrope_vit_small_patch16_224", pretrained=True)
