"""A ViT training step (forward, loss, backward, AdamW): on CPU per position encoding against the learned
baseline (`run`); on a GPU, ViT-B/16 compiled with ndrope's rotation against the same step with timm's
formula (`run_cuda`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

import ndrope
import ndrope._ops

from .peers import compiled_rotation
from .timing import measure, measure_cuda

# name: (NDRopeVisionTransformer kwargs, batch size). Tiny-ish on 32px images, and ViT-S/16 at 224.
CONFIGS: dict[str, tuple[dict[str, int], int]] = {
    "tiny-32px": (dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, num_classes=10), 64),
    "small-224": (dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, num_classes=1000), 8),
}
POS_EMBEDS = ("learned", "rope_axial", "rope_mixed")
LIMITS = {"rope_axial": 1.05, "rope_mixed": 1.10}  # step-time budget vs "learned"


def unavailable() -> str | None:
    """Why the ViT bench cannot run, or None when the `vit` package is importable."""
    try:
        import vit  # noqa: F401 (availability check)
    except ImportError as error:
        return f"the vit package is not importable yet ({error})"
    return None


@contextlib.contextmanager
def _counting(counts: dict[str, int]) -> Iterator[None]:
    """Count rotation tables built (`RotaryEmbedding.rotation`) and tensors rotated (by the ``ndrope::rotate``
    op, or two at a time by ``ndrope::rotate_pair``)."""
    patched = [
        (ndrope.modules.RotaryEmbedding, "rotation", "angle tables", 1),
        (ndrope._ops, "rotate", "rotations", 1),
        (ndrope._ops, "rotate_pair", "rotations", 2),
    ]
    originals = [getattr(owner, attr) for owner, attr, _, _ in patched]

    def wrap(fn, key, weight):
        def counted(*args, **kwargs):
            counts[key] = counts.get(key, 0) + weight
            return fn(*args, **kwargs)

        return counted

    for (owner, attr, key, weight), original in zip(patched, originals):
        setattr(owner, attr, wrap(original, key, weight))
    try:
        yield
    finally:
        for (owner, attr, _, _), original in zip(patched, originals):
            setattr(owner, attr, original)


def run(configs: Sequence[str], repeats: int) -> list[dict[str, Any]]:
    """One row per (config, pos_embed): ms per step (median, min), ratios to learned, per-forward counts."""
    import vit

    rows = []
    for config_name in configs:
        model_args, batch = CONFIGS[config_name]
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(batch, 3, model_args["img_size"], model_args["img_size"], generator=generator)
        labels = torch.randint(model_args["num_classes"], (batch,), generator=generator)
        steps, counts = {}, {}
        for pos_embed in POS_EMBEDS:
            torch.manual_seed(0)
            model = vit.NDRopeVisionTransformer(pos_embed, **model_args).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step(model=model, optimizer=optimizer, images=images, labels=labels) -> torch.Tensor:
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(images), labels)
                loss.backward()
                optimizer.step()
                return loss.detach()

            step()  # builds caches (and the C++ kernel) before counting
            counts[pos_embed] = {}
            with _counting(counts[pos_embed]):
                model(images)  # with grad, as in training: learned angles are not cached then
            steps[pos_embed] = step
        seconds = measure(steps, repeats, warmup=1, settle=False)
        base = seconds["learned"]
        for pos_embed in POS_EMBEDS:
            ratio = seconds[pos_embed]["median"] / base["median"]
            limit = LIMITS.get(pos_embed)
            rows.append(
                dict(
                    config=config_name, batch=batch, pos_embed=pos_embed, ms=seconds[pos_embed]["median"] * 1e3,
                    min_ms=seconds[pos_embed]["min"] * 1e3, x_learned=ratio,
                    x_learned_min=seconds[pos_embed]["min"] / base["min"], limit=limit,
                    met=None if limit is None else ratio <= limit,
                    angle_tables_per_forward=counts[pos_embed].get("angle tables", 0),
                    rotations_per_forward=counts[pos_embed].get("rotations", 0), depth=model_args["depth"],
                )
            )
    return rows


# ViT-B/16 at 224, batch 64, bfloat16 autocast, compiled; ndrope's rotation (either compiled choice)
# against the same model whose attention rotates with timm's formula (`apply_rot_embed`).
CUDA_CONFIG: tuple[dict[str, int], int] = (
    dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=1000), 64
)
CUDA_CASES = ("ndrope, compiled: kernel", "ndrope, compiled: formula", "timm formula")
CUDA_LIMIT = 1.0  # ndrope's step (kernel) time / timm's


@contextlib.contextmanager
def _timm_rotation() -> Iterator[None]:
    """`ndrope.apply_rotary` / `apply_rotary_pair`, as vit's attention calls them, replaced by timm's formula."""
    from timm.layers.pos_embed_sincos import apply_rot_embed

    def rotate(x: torch.Tensor, rotation: Any, *, layout: str = "half") -> torch.Tensor:
        cos, sin = rotation if isinstance(rotation, (tuple, list)) else ndrope.cos_sin(rotation)
        if 2 * cos.shape[-1] != x.shape[-1]:
            raise ValueError("timm's apply_rot_embed rotates whole heads; this model rotates part of them")
        half = layout == "half"
        cos, sin = ((torch.cat((t, t), -1) if half else t.repeat_interleave(2, -1)) for t in (cos, sin))
        return apply_rot_embed(x, sin, cos, half=half)

    def rotate_pair(q: torch.Tensor, k: torch.Tensor, rotation: Any, *, layout: str = "half") -> tuple[torch.Tensor, torch.Tensor]:
        return rotate(q, rotation, layout=layout), rotate(k, rotation, layout=layout)

    originals = ndrope.apply_rotary, ndrope.apply_rotary_pair
    ndrope.apply_rotary, ndrope.apply_rotary_pair = rotate, rotate_pair
    try:
        yield
    finally:
        ndrope.apply_rotary, ndrope.apply_rotary_pair = originals


def run_cuda(repeats: int) -> list[dict[str, Any]]:
    """One row per `CUDA_CASES` entry: ms per compiled ViT-B/16 training step (median, min), and the
    ratio to the step with timm's formula (paired by round)."""
    import vit

    from .rotary import paired_ratio

    model_args, batch = CUDA_CONFIG
    generator = torch.Generator(device="cuda").manual_seed(0)
    images = torch.randn(batch, 3, model_args["img_size"], model_args["img_size"], device="cuda", generator=generator)
    labels = torch.randint(model_args["num_classes"], (batch,), device="cuda", generator=generator)
    torch.compiler.reset()
    steps = {}
    for case in CUDA_CASES:
        torch.manual_seed(0)
        model = vit.NDRopeVisionTransformer("rope_axial", **model_args).cuda().train()
        compiled = torch.compile(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        context = _timm_rotation if case == "timm formula" else (lambda c=case: compiled_rotation(c.rpartition(": ")[2]))

        def step(compiled=compiled, optimizer=optimizer, context=context) -> torch.Tensor:
            with context(), torch.autocast("cuda", dtype=torch.bfloat16):
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(compiled(images), labels)
            loss.backward()
            optimizer.step()
            return loss.detach()

        step()  # compiles (forward and backward) before timing
        steps[case] = step
    seconds = measure_cuda(steps, repeats, calls=1)
    base = seconds["timm formula"]
    rows = []
    for case in CUDA_CASES:
        ratio = paired_ratio(seconds[case]["rounds"], [base["rounds"]])
        rows.append(
            dict(
                config="ViT-B/16 224", batch=batch, case=case, ms=seconds[case]["median"] * 1e3,
                min_ms=seconds[case]["min"] * 1e3, x_timm=ratio,
                limit=CUDA_LIMIT if case == CUDA_CASES[0] else None,
                met=None if case != CUDA_CASES[0] else ratio <= CUDA_LIMIT,
            )
        )
    return rows
