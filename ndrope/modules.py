"""`RotaryEmbedding`: the stateful wrapper around `ndrope.functional` (frequencies, caching, modes)."""

from __future__ import annotations

from typing import Literal, Sequence, Union

import torch
from torch import Tensor, nn

from . import functional as rope_f
from ._checks import check_choice, check_even_dim, check_int, check_shape
from .positions import augment_positions, grid

Kind = Literal["axial", "mixed"]
ResolutionMode = Literal["extrapolate", "interpolate", "ntk"]
KINDS: tuple[str, ...] = ("axial", "mixed")
RESOLUTION_MODES: tuple[str, ...] = ("extrapolate", "interpolate", "ntk")
#: Positions as a tensor (..., N, A), or the shape of a row-major grid.
Positions = Union[Tensor, Sequence[int]]


class RotaryEmbedding(nn.Module):
    """Axial or mixed N-D RoPE for attention with q, k of shape (B, H, N, D).

    >>> rope = RotaryEmbedding(dim=64, n_axes=2, reference_shape=(14, 14))
    >>> q, k = rope(q, k, (14, 14))                     # grid positions, cached per shape/device
    >>> q, k = rope(q, k, positions)                    # or any (N, A) / (B, N, A) positions

    Args:
        dim: rotated channels per head (D, or less for partial rotation: the first ``dim`` rotate).
        n_axes: A, number of position coordinates (1 text, 2 image, 3 video, 4 volume over time).
        kind: ``"axial"`` (fixed, axis-separated) or ``"mixed"`` (per-head learnable, Heo et al.).
        num_heads: H, required for ``"mixed"``.
        theta: frequency base; default 10000 (axial), 10 (mixed, as in Heo et al.).
        axis_dims: pairs per axis (must add up to ``dim // 2``); default an even split.
        layout: channel pairing, ``"half"`` (j, j + D/2) or ``"interleaved"`` (2j, 2j + 1).
        learnable: learn the frequencies; default False for axial, True for mixed.
        reference_shape: the training grid, used by the ``"interpolate"`` and ``"ntk"`` modes.
        resolution_mode: how a grid other than ``reference_shape`` is positioned: ``"extrapolate"``
            (integer indices), ``"interpolate"`` (rescaled to span the reference grid) or ``"ntk"``
            (integer indices, NTK-aware theta scaling).
        shift, jitter, rescale: train-time coordinate augmentation (see `augment_positions`); off by
            default, applied only in training mode.
        generator: seeds the mixed initialisation.

    Tokens in front of the positioned ones (class token, registers) pass through unrotated: when
    q has more tokens than there are positions, the first ``q.shape[-2] - N`` are left as they are.
    """

    #: How many (grid shape, device, dtype, mode) tables `cos_sin` keeps.
    CACHE_SIZE = 16

    def __init__(
        self,
        dim: int,
        n_axes: int = 1,
        *,
        kind: Kind = "axial",
        num_heads: int | None = None,
        theta: float | None = None,
        axis_dims: Sequence[int] | None = None,
        layout: rope_f.Layout = "half",
        learnable: bool | None = None,
        reference_shape: Sequence[int] | None = None,
        resolution_mode: ResolutionMode = "extrapolate",
        shift: float = 0.0,
        jitter: float = 1.0,
        rescale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        check_choice("kind", kind, KINDS)
        check_choice("layout", layout, rope_f.LAYOUTS)
        check_int("n_axes", n_axes)
        self.dim, self.n_axes, self.kind, self.layout = dim, n_axes, kind, layout
        self.reference_shape = None if reference_shape is None else self._check_grid("reference_shape", reference_shape)
        self.resolution_mode: str = "extrapolate"
        self.set_resolution_mode(resolution_mode)
        augment_positions(torch.zeros(1, n_axes), shift=shift, jitter=jitter, rescale=rescale)  # validates
        self.shift, self.jitter, self.rescale = float(shift), float(jitter), float(rescale)
        sizes = rope_f.split_pairs(check_even_dim("dim", dim) // 2, n_axes, axis_dims)
        if kind == "axial":
            if num_heads is not None:
                check_int("num_heads", num_heads)
            self.theta = 10000.0 if theta is None else theta
            freqs = rope_f.axial_frequencies(dim, n_axes, theta=self.theta, axis_dims=sizes)
            learnable = False if learnable is None else learnable
        else:
            if num_heads is None:
                raise ValueError("num_heads is required for kind='mixed' (frequencies are per head)")
            self.theta = 10.0 if theta is None else theta
            freqs = rope_f.mixed_frequencies(dim, n_axes, num_heads, theta=self.theta, axis_dims=sizes, generator=generator)
            learnable = True if learnable is None else learnable
        self.num_heads = num_heads
        self.learnable = bool(learnable)
        if self.learnable:
            self.freqs = nn.Parameter(freqs)
        else:
            # fixed axial/mixed tables are recomputable from the config, so they stay out of checkpoints
            self.register_buffer("freqs", freqs, persistent=kind == "mixed")
        self.register_buffer("ladder_fraction", rope_f.ladder_fraction(sizes), persistent=False)
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, n_axes={self.n_axes}, kind={self.kind!r}, num_heads={self.num_heads}, theta={self.theta}, "
            f"layout={self.layout!r}, learnable={self.learnable}, reference_shape={self.reference_shape}, "
            f"resolution_mode={self.resolution_mode!r}"
        )

    def _check_grid(self, name: str, shape: Sequence[int]) -> tuple[int, ...]:
        shape = check_shape(name, shape)
        if len(shape) != self.n_axes:
            raise ValueError(f"{name}={shape} must have n_axes={self.n_axes} sizes")
        return shape

    @property
    def augmenting(self) -> bool:
        return self.training and (self.shift != 0.0 or self.jitter != 1.0 or self.rescale != 1.0)

    def set_resolution_mode(self, mode: ResolutionMode) -> None:
        """Choose how grids other than ``reference_shape`` are positioned (see the class docstring)."""
        check_choice("resolution_mode", mode, RESOLUTION_MODES)
        if mode != "extrapolate" and self.reference_shape is None:
            raise ValueError(f"resolution_mode={mode!r} needs reference_shape (the training grid)")
        self.resolution_mode = mode
        self._cache = {}

    def grid_positions(self, grid_shape: Sequence[int]) -> Tensor:
        """Positions (N, A) of a grid under the current resolution mode (before augmentation)."""
        grid_shape = self._check_grid("grid_shape", grid_shape)
        reference = self.reference_shape if self.resolution_mode == "interpolate" else None
        return grid(grid_shape, reference_shape=reference, device=self.freqs.device)

    def frequencies(self, grid_shape: Sequence[int] | None = None) -> Tensor:
        """Frequencies (A, P) or (H, A, P) in effect for ``grid_shape`` (NTK-scaled in ``"ntk"`` mode)."""
        if self.resolution_mode != "ntk" or grid_shape is None or tuple(grid_shape) == self.reference_shape:
            return self.freqs
        scale = [size / ref for size, ref in zip(grid_shape, self.reference_shape)]
        return rope_f.ntk_scaled_frequencies(self.freqs, scale, self.ladder_fraction)

    def angles(self, positions: Positions, *, num_prefix_tokens: int = 0) -> Tensor:
        """Angles (..., n_prefix + N, P), or (..., H, n_prefix + N, P) for mixed; zero for prefix tokens.

        ``positions`` is a grid shape (positioned by the resolution mode, NTK included) or explicit
        (..., N, A) coordinates (used as given: NTK scaling needs a grid shape to compare with
        ``reference_shape``, so it does not apply to them).
        """
        check_int("num_prefix_tokens", num_prefix_tokens, minimum=0)
        from_grid = not isinstance(positions, Tensor)
        if from_grid:
            grid_shape = self._check_grid("positions (grid shape)", positions)
            positions = self.grid_positions(grid_shape)
        else:
            grid_shape = None
            if positions.shape[-1:] != (self.n_axes,):
                raise ValueError(
                    f"positions shape {tuple(positions.shape)} must end with n_axes={self.n_axes} coordinates"
                )
        if self.augmenting:
            positions = augment_positions(
                positions, shift=self.shift, jitter=self.jitter, rescale=self.rescale, check_finite_positions=not from_grid
            )
            from_grid = True  # augment_positions checked (or grid made) finite positions
        theta = rope_f.angles(
            positions.to(self.freqs.device), self.frequencies(grid_shape), check_finite_positions=not from_grid
        )
        if num_prefix_tokens:
            pad = theta.new_zeros(*theta.shape[:-2], num_prefix_tokens, theta.shape[-1])
            theta = torch.cat((pad, theta), dim=-2)
        return theta

    def cos_sin(self, positions: Positions, *, num_prefix_tokens: int = 0) -> tuple[Tensor, Tensor]:
        """(cos, sin) of `angles`: compute once per forward and pass to every layer.

        Fixed (non-learnable) frequencies on a grid shape are cached per shape, prefix, device,
        dtype and resolution mode, keeping the `CACHE_SIZE` most recently used entries.
        """
        cacheable = (
            not isinstance(positions, Tensor)
            and not self.learnable
            and not self.augmenting
            and not torch.compiler.is_compiling()
        )
        if not cacheable:
            return rope_f.cos_sin(self.angles(positions, num_prefix_tokens=num_prefix_tokens))
        key = (tuple(positions), num_prefix_tokens, self.freqs.device, self.freqs.dtype, self.freqs._version, self.resolution_mode)
        if key in self._cache:
            self._cache[key] = self._cache.pop(key)  # most recently used goes last
        else:
            self._cache[key] = rope_f.cos_sin(self.angles(positions, num_prefix_tokens=num_prefix_tokens))
            while len(self._cache) > self.CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
        return self._cache[key]

    def rotate(self, x: Tensor, rotation: rope_f.Rotation) -> Tensor:
        """Rotate x (..., N, D) by precomputed angles or (cos, sin) from this module's layout."""
        return rope_f.apply_rotary(x, rotation, layout=self.layout)

    def forward(
        self, q: Tensor, k: Tensor, positions: Positions, *, num_prefix_tokens: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Rotate q and k (B, H, N, D); ``positions`` (N, A), (B, N, A) or a grid shape."""
        n_positions = positions.shape[-2] if isinstance(positions, Tensor) else None
        if n_positions is None:
            n_positions = 1
            for size in self._check_grid("positions (grid shape)", positions):
                n_positions *= size
        inferred = q.shape[-2] - n_positions
        if num_prefix_tokens is None:
            num_prefix_tokens = inferred
        if inferred < 0 or num_prefix_tokens != inferred:
            raise ValueError(
                f"q has {q.shape[-2]} tokens but positions cover {n_positions}"
                + ("" if num_prefix_tokens == inferred else f" after num_prefix_tokens={num_prefix_tokens}")
                + "; positions must cover every token after the unrotated prefix (class token, registers)"
            )
        if k.shape[-2] != q.shape[-2]:
            raise ValueError(f"q has {q.shape[-2]} tokens but k has {k.shape[-2]}; self-attention q and k must match")
        rotation = self.cos_sin(positions, num_prefix_tokens=num_prefix_tokens)
        return self.rotate(q, rotation), self.rotate(k, rotation)
