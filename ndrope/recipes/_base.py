"""What every recipe returns: a frozen `RopeRecipe` (frequencies, layout, attention scale, coordinates).

Shape alphabet: B batch, H heads, N tokens, D channels per head, A axes, P rotated pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from .. import Layout, augment_positions
from .. import angles as _angles
from .._checks import check_choice, check_shape, check_tensor
from ..functional import _block_frequencies as block_axial  # noqa: F401 (one block layout for ndrope and its recipes)

#: How a grid turns into coordinates: integer indices, ``linspace(-1, 1)`` per axis (timm / rotary-embedding-torch
#: "pixel"), or patch centres normalised to [-1, 1] (DINOv3).
GridKind = Literal["index", "pixel", "centered"]
#: The denominator of a "centered" grid: each axis its own size, or the largest / smallest size for all axes.
Normalize = Literal["separate", "max", "min"]
#: Order of the coordinate columns: "ij" follows the grid shape (row, column, ...), "xy" swaps the first two
#: (column, row, ...), as naver RoPE-ViT and timm's ``grid_indexing="xy"`` do. Token order is row-major either way.
Indexing = Literal["ij", "xy"]


@dataclass(frozen=True)
class Coordinates:
    """The coordinate law of a grid recipe; ``coords(shape)`` gives positions (N, A), N = prod(shape).

    Per axis of size ``s`` (reference size ``r`` when ``reference_shape`` is given), index ``i``:
      * ``"index"``: ``(i + offset) * r / s`` (timm / EVA-02: the offset is added before the rescale);
      * ``"pixel"``: ``linspace(-1, 1, s)[i] * r / s``;
      * ``"centered"``: ``2 * (i + 0.5 + offset) / d - 1`` with ``d`` the axis size (``"separate"``) or the
        largest / smallest size (``"max"`` / ``"min"``) (DINOv3).
    """

    kind: GridKind = "index"
    reference_shape: tuple[int, ...] | None = None
    offset: float = 0.0
    normalize: Normalize = "separate"
    indexing: Indexing = "ij"

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, GridKind)
        check_choice("normalize", self.normalize, Normalize)
        check_choice("indexing", self.indexing, Indexing)
        if self.reference_shape is not None:
            object.__setattr__(self, "reference_shape", check_shape("reference_shape", self.reference_shape))
        if isinstance(self.offset, bool) or not isinstance(self.offset, (int, float)) or not math.isfinite(self.offset):
            raise ValueError(f"offset={self.offset!r} must be a finite number")

    def __call__(
        self,
        shape: int | Sequence[int],
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Positions (N, A) of a row-major grid, computed in float64 and returned as ``dtype`` (float32 unless asked)."""
        shape = check_shape("shape", shape)
        reference = self.reference_shape
        if reference is not None and len(reference) != len(shape):
            raise ValueError(f"reference_shape={reference} must have as many axes as shape={shape}")
        if self.kind == "centered":
            denominator = {"separate": shape, "max": (max(shape),) * len(shape), "min": (min(shape),) * len(shape)}
            denoms = denominator[self.normalize]
        axes = []
        for a, size in enumerate(shape):
            index = torch.arange(size, dtype=torch.float64, device=device)
            if self.kind == "index":
                coord = index + self.offset
            elif self.kind == "pixel":
                coord = torch.linspace(-1.0, 1.0, size, dtype=torch.float64, device=device)
            else:
                coord = (index + 0.5 + self.offset) / denoms[a]
            if reference is not None:
                coord = coord / size * reference[a]
            if self.kind == "centered":
                coord = 2.0 * coord - 1.0
            axes.append(coord)
        mesh = torch.meshgrid(*axes, indexing="ij")
        positions = torch.stack(mesh, dim=-1).reshape(-1, len(shape))
        if self.indexing == "xy" and len(shape) >= 2:
            positions = positions[:, [1, 0, *range(2, len(shape))]]
        return positions.to(dtype)


@dataclass(frozen=True, eq=False)
class RopeRecipe:
    """A RoPE scheme as ``ndrope`` consumes it.

    Attributes:
        freqs: F (A, P) or (H, A, P), float64: pair j of a token at position p turns by ``p @ F[:, j]``.
        layout: how pairs sit in the head dim (``"half"``: (j, j + P), ``"interleaved"``: (2j, 2j + 1));
            pass it to `ndrope.apply_rotary`.
        attention_scale: factor on cos and sin (YaRN / LongRoPE "attention factor"; the rotated channels of
            q and k are both multiplied by it, as transformers does). 1.0 for most schemes.
        coordinates: the grid law of `positions` (text: indices 0..N-1).
    """

    freqs: Tensor
    layout: Layout = "half"
    attention_scale: float = 1.0
    coordinates: Coordinates = field(default_factory=Coordinates)

    def __post_init__(self) -> None:
        check_tensor("freqs", self.freqs, min_rank=2)
        check_choice("layout", self.layout, Layout)
        if not math.isfinite(self.attention_scale) or self.attention_scale <= 0:
            raise ValueError(f"attention_scale={self.attention_scale!r} must be a positive finite number")

    @property
    def n_axes(self) -> int:
        return self.freqs.shape[-2]

    def positions(
        self,
        shape: int | Sequence[int],
        *,
        shift: float = 0.0,
        jitter: float = 1.0,
        rescale: float = 1.0,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Positions (N, A) of a row-major grid ``shape`` (an int for text) by this recipe's coordinate law.

        float32 unless ``dtype`` asks otherwise, so that `rotation` gives float32 tables for a float32 model
        (float64 positions give float64 tables: ask for them for a float64 reference).

        ``shift``, ``jitter``, ``rescale`` apply `ndrope.augment_positions` (DINOv3's train-time law); off by default.
        """
        shape = check_shape("shape", shape)
        if len(shape) != self.n_axes:
            raise ValueError(f"shape={shape} has {len(shape)} axes but this recipe has n_axes={self.n_axes}")
        positions = self.coordinates(shape, dtype=torch.float64, device=device)
        if (shift, jitter, rescale) != (0.0, 1.0, 1.0):
            positions = augment_positions(positions, shift=shift, jitter=jitter, rescale=rescale, generator=generator)
        return positions.to(dtype)

    def angles(self, positions: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
        """Angles (..., N, P) (or (..., H, N, P)) for positions (..., N, A); computed in float64.

        Result dtype: ``dtype`` if given, else float64 for float64 positions and float32 otherwise (reduced
        modulo 2*pi in float64 first, so large positions keep their accuracy).
        """
        check_tensor("positions", positions, min_rank=2)
        return _angles(positions, self.freqs.to(positions.device), dtype=dtype)

    def rotation(self, positions: Tensor, *, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """(cos, sin), each (..., N, P), times ``attention_scale``: the rotation `ndrope.apply_rotary` takes."""
        phase = self.angles(positions, dtype=dtype)
        cos, sin = torch.cos(phase), torch.sin(phase)
        if self.attention_scale != 1.0:
            cos, sin = cos * self.attention_scale, sin * self.attention_scale
        return cos, sin


def ladder(pairs: int, theta: float, *, denominator: float | None = None) -> Tensor:
    """The 1D RoPE ladder (pairs,), float64: ``theta ** (-2k / d)`` with ``d = denominator`` (default 2 * pairs)."""
    d = 2 * pairs if denominator is None else denominator
    return 1.0 / theta ** (torch.arange(0, 2 * pairs, 2, dtype=torch.float64) / d)
