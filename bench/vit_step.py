"""A ViT training step (forward, loss, backward, AdamW) per position encoding, against the learned baseline."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

import ndrope
import ndrope._ops

from .timing import measure

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
    """Count rotation tables built (`RotaryEmbedding.rotation`) and rotations applied (the ``ndrope::rotate`` op)."""
    patched = [
        (ndrope.modules.RotaryEmbedding, "rotation", "angle tables"),
        (ndrope._ops, "rotate", "rotations"),
    ]
    originals = [getattr(owner, attr) for owner, attr, _ in patched]

    def wrap(fn, key):
        def counted(*args, **kwargs):
            counts[key] = counts.get(key, 0) + 1
            return fn(*args, **kwargs)

        return counted

    for (owner, attr, key), original in zip(patched, originals):
        setattr(owner, attr, wrap(original, key))
    try:
        yield
    finally:
        for (owner, attr, _), original in zip(patched, originals):
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
