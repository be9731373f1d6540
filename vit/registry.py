"""timm entry points: ``timm.create_model("ndrope_vit_small_patch16_224", pos_embed="rope_axial")``.

Importing `vit` runs this module, which registers the names below with timm. Each entry point takes
every `NDRopeVisionTransformer` keyword (``pos_embed`` defaults to `DEFAULT_POS_EMBED`), so
``depth=2`` or ``embed_dim=48`` shrink a model for tests. No pretrained weights are published.
"""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .model import NDRopeVisionTransformer

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": False,  # any multiple of the patch size works
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        **kwargs,
    }


# the 32 px models are CIFAR-sized: 10 classes and CIFAR-10 statistics unless told otherwise
_cifar = dict(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, mean=CIFAR10_MEAN, std=CIFAR10_STD)
default_cfgs = generate_default_cfgs(
    {
        "ndrope_vit_tiny_patch16_224": _cfg(),
        "ndrope_vit_small_patch16_224": _cfg(),
        "ndrope_vit_base_patch16_224": _cfg(),
        "ndrope_vit_tiny_patch4_32": _cfg(**_cifar),
        "ndrope_vit_small_patch4_32": _cfg(**_cifar),
        "ndrope_vit_base_patch4_32": _cfg(**_cifar),
    }
)
#: The registered timm model names.
MODEL_NAMES: tuple[str, ...] = tuple(default_cfgs)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> NDRopeVisionTransformer:
    if pretrained:
        raise ValueError(f"pretrained=True: no pretrained weights are published for {variant!r}; use pretrained=False")
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        NDRopeVisionTransformer,
        variant,
        pretrained,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


@register_model
def ndrope_vit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> NDRopeVisionTransformer:
    """ViT-Ti/16 at 224 px: C 192, L 12, H 3."""
    model_args = dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create("ndrope_vit_tiny_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def ndrope_vit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> NDRopeVisionTransformer:
    """ViT-S/16 at 224 px: C 384, L 12, H 6."""
    model_args = dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create("ndrope_vit_small_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def ndrope_vit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> NDRopeVisionTransformer:
    """ViT-B/16 at 224 px: C 768, L 12, H 12."""
    model_args = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create("ndrope_vit_base_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def ndrope_vit_tiny_patch4_32(pretrained: bool = False, **kwargs: Any) -> NDRopeVisionTransformer:
    """ViT-Ti/4 at 32 px (CIFAR, 8 x 8 patches): C 192, L 12, H 3."""
    model_args = dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3)
    return _create("ndrope_vit_tiny_patch4_32", pretrained, **dict(model_args, **kwargs))


@register_model
def ndrope_vit_small_patch4_32(pretrained: bool = False, **kwargs: Any) -> NDRopeVisionTransformer:
    """ViT-S/4 at 32 px (CIFAR, 8 x 8 patches): C 384, L 12, H 6."""
    model_args = dict(img_size=32, patch_size=4, embed_dim=384, depth=12, num_heads=6)
    return _create("ndrope_vit_small_patch4_32", pretrained, **dict(model_args, **kwargs))


@register_model
def ndrope_vit_base_patch4_32(pretrained: bool = False, **kwargs: Any) -> NDRopeVisionTransformer:
    """ViT-B/4 at 32 px (CIFAR, 8 x 8 patches): C 768, L 12, H 12."""
    model_args = dict(img_size=32, patch_size=4, embed_dim=768, depth=12, num_heads=12)
    return _create("ndrope_vit_base_patch4_32", pretrained, **dict(model_args, **kwargs))
