"""`RotaryEmbedding`: a thin module that holds frequencies and answers "the rotation for these positions"."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import functional as rope_f
from ._checks import check_choice, check_finite, check_int, check_shape, check_tensor, choices
from .positions import grid

#: How a grid other than the training grid (``reference_shape``) is positioned: ``"extrapolate"``
#: integer indices (a larger grid reaches new positions), ``"interpolate"`` indices rescaled to span
#: the reference grid (EVA-02), ``"ntk"`` integer indices with NTK-aware frequency scaling per axis.
ResolutionMode = Literal["extrapolate", "interpolate", "ntk"]
RESOLUTION_MODES: tuple[str, ...] = choices(ResolutionMode)
#: Positions as a tensor (..., N, A), or the shape of a row-major grid.
Positions = Tensor | Sequence[int]


class RotaryEmbedding(nn.Module):
    """N-D RoPE for attention with q, k of shape (B, H, N, D), built on a frequency matrix F.

    ``RotaryEmbedding(dim, n_axes, theta=...)`` is axial RoPE with fixed frequencies,
    `RotaryEmbedding.mixed` is RoPE-Mixed (learned per head), `RotaryEmbedding.from_frequencies`
    takes any F (A, P) or (H, A, P). Everything else is an argument of `rotation` / `forward`: the
    module keeps no state but its frequencies and, for fixed frequencies, the (cos, sin) table of the
    reference grid (a non-persistent buffer, as timm does, rebuilt on device/dtype moves and on
    ``load_state_dict``; edit fixed frequencies through those, not in place); other grids are
    computed on demand.

        rope = ndrope.RotaryEmbedding(64, n_axes=2, theta=100.0, reference_shape=(14, 14))
        q, k = rope(q, k, (14, 14))                        # a grid shape: row-major grid positions
        q, k = rope(q, k, (20, 20), mode="interpolate")    # another grid, rescaled onto 14 x 14
        q, k = rope(q, k, positions)                       # or any (N, A) / (B, N, A) positions
        cos, sin = rope.rotation((14, 14), num_prefix_tokens=1)   # once per forward, for every layer

    Args:
        dim: rotated channels per head (D, or less for partial rotation: the first ``dim`` rotate).
        n_axes: A, coordinates per position (1 text, 2 image, 3 video, 4 volume over time).
        theta: frequency base of the ladder (Llama 500000, ViTs often 100).
        axis_dims: pairs per axis (must add up to ``dim // 2``); default an even split.
        layout: channel pairing, ``"half"`` (j, j + P) or ``"interleaved"`` (2j, 2j + 1).
        reference_shape: the training grid: its table is precomputed, and the ``"interpolate"`` and
            ``"ntk"`` modes position other grids relative to it.
        device: where the frequencies live.

    Frequencies stay in float64 (fixed) or float32 (learned) whatever the module is cast to
    (``.to(torch.bfloat16)``, ``.half()``): angles at large positions need them.
    """

    def __init__(
        self,
        dim: int,
        n_axes: int = 1,
        *,
        theta: float = 10000.0,
        axis_dims: Sequence[int] | None = None,
        layout: rope_f.Layout = "half",
        reference_shape: Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        freqs = rope_f.axial_frequencies(dim, n_axes, theta=theta, axis_dims=axis_dims, device=device)
        self._setup(freqs, learnable=False, persistent=False, layout=layout, reference_shape=reference_shape)

    @classmethod
    def from_frequencies(
        cls,
        freqs: Tensor,
        *,
        learnable: bool = False,
        layout: rope_f.Layout = "half",
        reference_shape: Sequence[int] | None = None,
    ) -> RotaryEmbedding:
        """RoPE with any frequency matrix F (A, P) or (H, A, P) (for example a `ndrope.recipes` one).

        ``learnable=True`` makes F a parameter (kept in float32 at least); fixed F is a buffer that is
        saved in the state dict (it may not be recomputable from a config).
        """
        check_tensor("freqs", freqs, min_rank=2)
        if freqs.dim() > 3 or not freqs.is_floating_point():
            raise ValueError(f"freqs must be a floating (A, P) or (H, A, P) tensor, got {freqs.dtype} {tuple(freqs.shape)}")
        check_finite("freqs", freqs)
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._setup(freqs, learnable=learnable, persistent=True, layout=layout, reference_shape=reference_shape)
        return module

    @classmethod
    def mixed(
        cls,
        dim: int,
        n_axes: int,
        num_heads: int,
        *,
        theta: float = 10.0,
        axis_dims: Sequence[int] | None = None,
        learnable: bool = True,
        layout: rope_f.Layout = "half",
        reference_shape: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> RotaryEmbedding:
        """RoPE-Mixed (Heo et al. 2024): per-head frequencies (H, A, D // 2) from `ndrope.mixed_frequencies`,
        learned by default (theta 10, as in the paper)."""
        freqs = rope_f.mixed_frequencies(
            dim, n_axes, num_heads, theta=theta, axis_dims=axis_dims, generator=generator, device=device
        )
        return cls.from_frequencies(freqs, learnable=learnable, layout=layout, reference_shape=reference_shape)

    def _setup(
        self, freqs: Tensor, *, learnable: bool, persistent: bool, layout: str, reference_shape: Sequence[int] | None
    ) -> None:
        self.layout = check_choice("layout", layout, rope_f.Layout)
        if not isinstance(learnable, bool):
            raise TypeError(f"learnable={learnable!r} must be a bool")
        self.n_axes = freqs.shape[-2]
        self.reference_shape = None if reference_shape is None else self._check_grid("reference_shape", reference_shape)
        if learnable:
            self.freqs = nn.Parameter(freqs.to(torch.promote_types(freqs.dtype, torch.float32)))
        else:
            self.register_buffer("freqs", freqs.to(torch.promote_types(freqs.dtype, torch.float32)), persistent=persistent)
        self._freqs_dtype = self.freqs.dtype
        self._table_dtype = torch.float32  # float64 after .double(); never below float32
        # the training grid's table, for fixed frequencies: rebuilt, never saved (timm's pattern)
        table = self._reference_table() if self.reference_shape is not None and not learnable else None
        self.register_buffer("reference_cos", None if table is None else table[0], persistent=False)
        self.register_buffer("reference_sin", None if table is None else table[1], persistent=False)
        self.register_load_state_dict_post_hook(_rebuild_reference_table)

    @property
    def learnable(self) -> bool:
        return isinstance(self.freqs, nn.Parameter)

    @property
    def pairs(self) -> int:
        """P, the rotated pairs: the first 2P channels of each head rotate."""
        return self.freqs.shape[-1]

    def extra_repr(self) -> str:
        heads = f", num_heads={self.freqs.shape[0]}" if self.freqs.dim() == 3 else ""
        return (
            f"pairs={self.pairs}, n_axes={self.n_axes}{heads}, learnable={self.learnable}, layout={self.layout!r}, "
            f"reference_shape={self.reference_shape}"
        )

    def _apply(self, fn: Any, recurse: bool = True) -> RotaryEmbedding:
        # .to(dtype)/.half()/.bfloat16() cast every floating tensor: keep the frequencies' precision
        # (and rebuild the table) while following device moves.
        exact = self.freqs.detach().clone()
        self._table_dtype = torch.promote_types(fn(torch.zeros((), dtype=self._table_dtype)).dtype, torch.float32)
        super()._apply(fn, recurse)
        if self.freqs.dtype != self._freqs_dtype:
            restored = exact.to(device=self.freqs.device)
            if self.learnable:
                self.freqs.data = restored
            else:
                self.freqs = restored
        self._refresh_reference_table()
        return self

    def _refresh_reference_table(self) -> None:
        if self.reference_cos is not None:
            self.reference_cos, self.reference_sin = self._reference_table()

    def _check_grid(self, name: str, shape: Sequence[int]) -> tuple[int, ...]:
        shape = check_shape(name, shape)
        if len(shape) != self.n_axes:
            raise ValueError(f"{name}={shape} must have n_axes={self.n_axes} sizes")
        return shape

    def _reference_table(self) -> tuple[Tensor, Tensor]:
        # never an inference tensor, whatever mode the module is built or moved in: it serves autograd
        with torch.no_grad(), torch.inference_mode(False):
            positions = grid(self.reference_shape, device=self.freqs.device)
            return rope_f.cos_sin(rope_f._phase(positions, self.freqs, self._table_dtype))

    def positions(self, grid_shape: Sequence[int], *, mode: ResolutionMode = "extrapolate") -> Tensor:
        """Positions (N, A) of a row-major grid under a resolution mode (``"ntk"`` positions are integer)."""
        grid_shape = self._check_grid("grid_shape", grid_shape)
        check_choice("mode", mode, ResolutionMode)
        if mode != "extrapolate" and self.reference_shape is None:
            raise ValueError(f"mode={mode!r} needs reference_shape (the training grid)")
        reference = self.reference_shape if mode == "interpolate" else None
        return grid(grid_shape, reference_shape=reference, device=self.freqs.device)

    def frequencies(self, grid_shape: Sequence[int] | None = None, *, mode: ResolutionMode = "extrapolate") -> Tensor:
        """Frequencies (A, P) or (H, A, P) in effect for ``grid_shape`` (NTK-scaled in ``"ntk"`` mode)."""
        check_choice("mode", mode, ResolutionMode)
        if mode != "ntk" or grid_shape is None or tuple(grid_shape) == self.reference_shape:
            return self.freqs
        if self.reference_shape is None:
            raise ValueError("mode='ntk' needs reference_shape (the training grid)")
        scale = [size / ref for size, ref in zip(self._check_grid("grid_shape", grid_shape), self.reference_shape)]
        return rope_f.ntk_scaled_frequencies(self.freqs, scale)

    def rotation(
        self, positions: Positions, *, mode: ResolutionMode = "extrapolate", num_prefix_tokens: int = 0
    ) -> tuple[Tensor, Tensor]:
        """(cos, sin), each (..., k + N, P), or (..., H, k + N, P) for per-head frequencies.

        ``positions`` is a grid shape (positioned by ``mode``) or explicit (..., N, A) coordinates
        (used as given). The first ``k = num_prefix_tokens`` rows are the identity (cos 1, sin 0): class
        and register tokens stay unrotated. Compute once per forward and pass to every layer.
        """
        check_int("num_prefix_tokens", num_prefix_tokens, minimum=0)
        check_choice("mode", mode, ResolutionMode)
        if isinstance(positions, Tensor):
            check_tensor("positions", positions, min_rank=2)
            if positions.shape[-1] != self.n_axes:
                raise ValueError(f"positions shape {tuple(positions.shape)} must end with n_axes={self.n_axes} coordinates")
            phase = rope_f.angles(positions.to(self.freqs.device), self.freqs, dtype=self._table_dtype)
            cos, sin = rope_f.cos_sin(phase)
        else:
            grid_shape = self._check_grid("grid_shape", positions)
            if self.reference_cos is not None and grid_shape == self.reference_shape:
                cos, sin = self.reference_cos, self.reference_sin
            else:
                freqs = self.frequencies(grid_shape, mode=mode)
                # grid positions are finite by construction: no NaN check (a device sync on GPU)
                phase = rope_f._phase(self.positions(grid_shape, mode=mode), freqs, self._table_dtype)
                cos, sin = rope_f.cos_sin(phase)
        if num_prefix_tokens:
            prefix = (*cos.shape[:-2], num_prefix_tokens, cos.shape[-1])
            cos = torch.cat((cos.new_ones(prefix), cos), dim=-2)
            sin = torch.cat((sin.new_zeros(prefix), sin), dim=-2)
        return cos, sin

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        positions: Positions,
        *,
        mode: ResolutionMode = "extrapolate",
        num_prefix_tokens: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Rotate q and k (B, H, N, D); ``positions`` (N, A), (B, N, A) or a grid shape.

        Tokens in front of the positioned ones (class token, registers) pass through unrotated: by
        default the first ``q.shape[-2] - N`` tokens.
        """
        check_tensor("q", q, min_rank=2)
        check_tensor("k", k, min_rank=2)
        if isinstance(positions, Tensor):
            n_positions = check_tensor("positions", positions, min_rank=2).shape[-2]
        else:
            n_positions = 1
            for size in self._check_grid("grid_shape", positions):
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
        rotation = self.rotation(positions, mode=mode, num_prefix_tokens=num_prefix_tokens)
        return rope_f.apply_rotary_pair(q, k, rotation, layout=self.layout)  # one call (one launch on CUDA)


def _rebuild_reference_table(module: RotaryEmbedding, incompatible_keys: Any) -> None:
    """After load_state_dict: the reference table follows the loaded frequencies."""
    module._refresh_reference_table()
