"""`RotaryEmbedding`: a thin module that holds frequencies and answers "the rotation for these positions"."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from torch import Tensor, nn

from . import functional as rope_f
from ._checks import check_choice, check_finite, check_int, check_number, check_shape, check_tensor, choices
from .positions import grid

if TYPE_CHECKING:
    from .recipes import RopeRecipe

#: How a grid other than the training grid (``reference_shape``) is positioned: ``"extrapolate"``
#: integer indices (a larger grid reaches new positions), ``"interpolate"`` indices rescaled to span
#: the reference grid (EVA-02), ``"ntk"`` integer indices with NTK-aware frequency scaling per axis.
ResolutionMode = Literal["extrapolate", "interpolate", "ntk"]
RESOLUTION_MODES: tuple[str, ...] = choices(ResolutionMode)
#: Positions as a tensor (..., N, A), or the shape of a row-major grid.
Positions = Tensor | Sequence[int]


class CoordinateLaw(Protocol):
    """A grid's coordinate law, such as `ndrope.recipes.Coordinates`: positions (N, A) of a row-major grid."""

    def __call__(self, shape: Sequence[int], *, dtype: torch.dtype, device: torch.device | str | None) -> Tensor: ...


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
        """RoPE with any frequency matrix F (A, P) or (H, A, P).

        ``learnable=True`` makes F a parameter (kept in float32 at least); fixed F is a buffer that is
        saved in the state dict (it may not be recomputable from a config). F is all this keeps: grids
        get integer `ndrope.grid` positions and cos/sin are not scaled. A `ndrope.recipes` scheme also
        carries an attention scale (YaRN 1 + 0.1 ln s) and a coordinate law (DINOv3's [-1, 1] centres):
        build it with `from_recipe`, which keeps both (a recipe passed here is refused).
        """
        if not isinstance(freqs, Tensor) and hasattr(freqs, "freqs") and hasattr(freqs, "coordinates"):
            raise TypeError(
                "from_frequencies takes a frequency tensor; for a recipe use RotaryEmbedding.from_recipe(recipe), "
                "which keeps its attention scale and coordinate law (recipe.freqs alone drops them)"
            )
        check_tensor("freqs", freqs, min_rank=2)
        if freqs.dim() > 3 or not freqs.is_floating_point():
            raise ValueError(f"freqs must be a floating (A, P) or (H, A, P) tensor, got {freqs.dtype} {tuple(freqs.shape)}")
        check_finite("freqs", freqs)
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._setup(freqs, learnable=learnable, persistent=True, layout=layout, reference_shape=reference_shape)
        return module

    @classmethod
    def from_recipe(
        cls,
        recipe: RopeRecipe,
        *,
        learnable: bool = False,
        reference_shape: Sequence[int] | None = None,
    ) -> RotaryEmbedding:
        """RoPE that rotates exactly as a `ndrope.recipes` scheme: its frequencies F, channel layout,
        attention scale (cos and sin times ``recipe.attention_scale``: YaRN, LongRoPE) and coordinate law
        (a grid shape is positioned by ``recipe.coordinates``: DINOv3's centres, EVA-02's rescale, ``xy``).

            rope = RotaryEmbedding.from_recipe(recipes.yarn(128, factor=4.0, original_max_position_embeddings=4096))
            cos, sin = rope.rotation(positions)        # (N, P) each, scaled by 1 + 0.1 ln 4

        Fixed frequencies are a non-persistent float64 buffer (the recipe recomputes them, so a state dict is
        the same with and without this module's table); ``learnable=True`` makes F a float32 parameter
        initialised from the recipe (saved). With a coordinate law other than integer indices, ``mode="interpolate"``
        applies only to index laws without a reference shape of their own (see `positions`).
        """
        for name in ("freqs", "layout", "attention_scale", "coordinates"):
            if not hasattr(recipe, name):
                raise TypeError(f"recipe must be an ndrope.recipes.RopeRecipe (no {name!r}), got {type(recipe).__name__}")
        check_finite("recipe.freqs", recipe.freqs)
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._setup(
            recipe.freqs.float() if learnable is True else recipe.freqs,  # learned in float32, as optimizers expect
            learnable=learnable,
            persistent=False,
            layout=recipe.layout,
            reference_shape=reference_shape,
            attention_scale=recipe.attention_scale,
            coordinates=None if _is_index_grid(recipe.coordinates) else recipe.coordinates,
        )
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
        self,
        freqs: Tensor,
        *,
        learnable: bool,
        persistent: bool,
        layout: str,
        reference_shape: Sequence[int] | None,
        attention_scale: float = 1.0,
        coordinates: CoordinateLaw | None = None,
    ) -> None:
        self.layout = check_choice("layout", layout, rope_f.Layout)
        if not isinstance(learnable, bool):
            raise TypeError(f"learnable={learnable!r} must be a bool")
        #: factor on cos and sin (a recipe's attention scale: YaRN, LongRoPE); 1.0 otherwise
        self.attention_scale = check_number("attention_scale", attention_scale)
        #: how a grid shape is positioned (a recipe's `Coordinates`); None: integer indices (`ndrope.grid`)
        self.coordinates = coordinates
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
        scale = f", attention_scale={self.attention_scale:g}" if self.attention_scale != 1.0 else ""
        law = f", coordinates={self.coordinates}" if self.coordinates is not None else ""
        return (
            f"pairs={self.pairs}, n_axes={self.n_axes}{heads}, learnable={self.learnable}, layout={self.layout!r}, "
            f"reference_shape={self.reference_shape}{scale}{law}"
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
            positions = self._grid_positions(self.reference_shape, "extrapolate", torch.float64)
            return self._scaled(rope_f.cos_sin(rope_f._phase(positions, self.freqs, self._table_dtype)))

    def _scaled(self, table: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        cos, sin = table
        if self.attention_scale != 1.0:
            return cos * self.attention_scale, sin * self.attention_scale
        return cos, sin

    def positions(self, grid_shape: Sequence[int], *, mode: ResolutionMode = "extrapolate") -> Tensor:
        """Positions (N, A), float32, of a row-major grid under a resolution mode (``"ntk"`` positions are
        those of ``"extrapolate"``). With a recipe's coordinate law (`from_recipe`) the law positions the
        grid; ``"interpolate"`` then rescales onto ``reference_shape`` only an index law without a reference
        shape of its own (a normalised law such as DINOv3's is resolution-free already)."""
        grid_shape = self._check_grid("grid_shape", grid_shape)
        check_choice("mode", mode, ResolutionMode)
        return self._grid_positions(grid_shape, mode, torch.float32)

    def _grid_positions(self, grid_shape: tuple[int, ...], mode: str, dtype: torch.dtype) -> Tensor:
        if mode != "extrapolate" and self.reference_shape is None:
            raise ValueError(f"mode={mode!r} needs reference_shape (the training grid)")
        reference = self.reference_shape if mode == "interpolate" else None
        if self.coordinates is None:
            return grid(grid_shape, reference_shape=reference, dtype=dtype, device=self.freqs.device)
        law = self.coordinates
        if reference is not None:
            if getattr(law, "kind", None) != "index" or getattr(law, "reference_shape", None) is not None:
                raise ValueError(
                    f"mode='interpolate' rescales integer grids, but this module positions grids by {law}; "
                    "use mode='extrapolate' (the law handles other grids) or 'ntk'"
                )
            law = dataclasses.replace(law, reference_shape=reference)
        return law(grid_shape, dtype=dtype, device=self.freqs.device)

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
            cos, sin = self._scaled(rope_f.cos_sin(phase))
        else:
            grid_shape = self._check_grid("grid_shape", positions)
            if self.reference_cos is not None and grid_shape == self.reference_shape:
                cos, sin = self.reference_cos, self.reference_sin
            else:
                freqs = self.frequencies(grid_shape, mode=mode)
                # grid positions are finite by construction: no NaN check (a device sync on GPU)
                phase = rope_f._phase(self._grid_positions(grid_shape, mode, torch.float64), freqs, self._table_dtype)
                cos, sin = self._scaled(rope_f.cos_sin(phase))
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
        return rope_f.apply_rotary(q, rotation, layout=self.layout), rope_f.apply_rotary(k, rotation, layout=self.layout)


def _is_index_grid(law: Any) -> bool:
    """Whether a coordinate law is `ndrope.grid`'s: integer (i, j, ...) indices, no offset or rescale."""
    defaults = {"kind": "index", "reference_shape": None, "offset": 0.0, "indexing": "ij"}
    return all(getattr(law, name, object()) == value for name, value in defaults.items())


def _rebuild_reference_table(module: RotaryEmbedding, incompatible_keys: Any) -> None:
    """After load_state_dict: the reference table follows the loaded frequencies."""
    module._refresh_reference_table()
