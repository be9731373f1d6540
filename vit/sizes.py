"""Image sizes for multi-resolution training (FlexiViT, ResFormer, NaViT): the sizes a model can be
trained at, and a seeded draw of one size per batch that a resumed run repeats.

A `NDRopeVisionTransformer` takes any multiple of its patch size, in training too: RoPE positions
follow the grid (placed by the resolution mode relative to the configured ``img_size``, which stays the
reference), a learned table is resampled to the grid, fixed tables and ALiBi are computed for it. What
a data pipeline needs from the model side is only which sizes are valid, checked here once, with
errors that name the argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ndrope._checks import check_int


def _patch_sides(patch_size: int | Sequence[int]) -> tuple[int, ...]:
    sides = (patch_size,) if isinstance(patch_size, int) and not isinstance(patch_size, bool) else patch_size
    if isinstance(sides, (str, bytes)) or not isinstance(sides, Sequence) or not sides:
        raise TypeError(f"patch_size={patch_size!r} must be a positive int or one per axis")
    return tuple(check_int("patch_size", side) for side in sides)


def check_image_sizes(
    sizes: Sequence[int], patch_size: int | Sequence[int], *, name: str = "img_sizes"
) -> tuple[int, ...]:
    """The sizes of a multi-resolution set, validated and sorted: a non-empty list of distinct ints,
    each a positive multiple of the patch size (of every side of a non-square patch). ``name``: the
    caller's argument, used in every error."""
    sides = _patch_sides(patch_size)
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise TypeError(f"{name}={sizes!r} must be a list of image sizes (ints)")
    if not sizes:
        raise ValueError(f"{name}=[] is empty: give at least one image size (a multiple of patch_size={patch_size})")
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"{name}={list(sizes)}: {size!r} is not an int image size")
    bad = [size for size in sizes if size < max(sides) or any(size % side for side in sides)]
    if bad:
        step = int(np.lcm.reduce(sides))
        raise ValueError(
            f"{name}={list(sizes)}: {bad} not a positive multiple of patch_size={patch_size}; "
            f"use multiples of {step} such as {[step * k for k in range(2, 6)]}"
        )
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"{name}={list(sizes)} repeats a size; each size is drawn with equal probability")
    return tuple(sorted(sizes))


def image_sizes_between(
    low: int, high: int, patch_size: int | Sequence[int], *, names: tuple[str, str] = ("min_size", "max_size")
) -> tuple[int, ...]:
    """Every multiple of the patch size in [low, high], ascending (a range as a size set); ``names``
    are the caller's arguments for ``low`` and ``high``."""
    sides = _patch_sides(patch_size)
    check_int(names[0], low)
    check_int(names[1], high)
    if low > high:
        raise ValueError(f"{names[0]}={low} must be <= {names[1]}={high}")
    step = int(np.lcm.reduce(sides))
    sizes = tuple(range(-(-max(low, step) // step) * step, high + 1, step))
    if not sizes:
        raise ValueError(f"[{names[0]}, {names[1]}] = [{low}, {high}] holds no multiple of patch_size={patch_size}")
    return sizes


def draw_image_size(sizes: Sequence[int], *, seed: int, epoch: int, batch_index: int) -> int:
    """One size of ``sizes`` for a batch, uniformly, determined by (seed, epoch, batch_index) alone: no
    state to save, so a run resumed mid-epoch draws the same sizes, and every data-parallel rank draws
    the same size for the same batch."""
    if not sizes:
        raise ValueError("sizes is empty: validate the set with check_image_sizes first")
    for name, value in (("seed", seed), ("epoch", epoch), ("batch_index", batch_index)):
        check_int(name, value, minimum=0)
    state = np.random.SeedSequence([seed, epoch, batch_index]).generate_state(1, dtype=np.uint64)[0]
    return sizes[int(state % np.uint64(len(sizes)))]
