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
    reference grid (a non-persistent buffer, as timm does, rebuilt by `reset_parameters` and on
    ``load_state_dict``; edit fixed frequencies through those, not in place); other grids are
    computed on demand.

    >>> import torch, ndrope
    >>> rope = ndrope.RotaryEmbedding(64, n_axes=2, theta=100.0, reference_shape=(14, 14))
    >>> q = k = torch.randn(2, 6, 1 + 14 * 14, 64)       # (B, H, N, D), a class token first
    >>> q_rot, k_rot = rope(q, k, (14, 14))              # a grid shape: row-major grid positions
    >>> q_rot.shape, torch.equal(q_rot[:, :, 0], q[:, :, 0])   # the class token is not rotated
    (torch.Size([2, 6, 197, 64]), True)
    >>> q = k = torch.randn(2, 6, 1 + 20 * 20, 64)
    >>> q_rot, k_rot = rope(q, k, (20, 20), mode="interpolate")   # another grid, rescaled onto 14 x 14
    >>> cos, sin = rope.rotation((14, 14), num_prefix_tokens=1)   # once per forward, for every layer
    >>> cos.shape                                        # (1 + N, P)
    torch.Size([197, 32])
    >>> positions = torch.tensor([[0.0, 0.0], [0.5, 2.0], [3.0, 1.0]])   # or any (N, A) positions
    >>> rope(torch.randn(1, 6, 3, 64), torch.randn(1, 6, 3, 64), positions)[0].shape
    torch.Size([1, 6, 3, 64])

    Args:
        dim: rotated channels per head (D, or less for partial rotation: the first ``dim`` rotate).
        n_axes: A, coordinates per position (1 text, 2 image, 3 video, 4 volume over time).
        theta: frequency base of the ladder (Llama 500000, ViTs often 100).
        axis_dims: pairs per axis (must add up to ``dim // 2``); default an even split.
        layout: channel pairing, ``"half"`` (j, j + P) or ``"interleaved"`` (2j, 2j + 1).
        reference_shape: the training grid: its table is precomputed, and the ``"interpolate"`` and
            ``"ntk"`` modes position other grids relative to it.
        device: where the frequencies live.

    Precision under casts: fixed frequencies are exact whatever the module is cast to
    (``.to(torch.bfloat16)``, ``.half()``, FSDP's ``buffer_dtype``): the module keeps the float64
    values it was built with (or loaded) and uses them when a cast has rounded the buffer. The
    reference table is a float32 cache used only while it is float32 (a cast to another dtype and back,
    ``.half().float()``, rounds it: call `reset_parameters` after such a chain). Learned frequencies are
    parameters and follow casts like every parameter (their gradients with them); keep them in float32
    (autocast, mixed-precision master weights) for exact angles. Tables are float32, or float64 for
    float64 activations (``forward``, ``rotation(..., dtype=)``), float64 positions or float64 learned
    frequencies.

    Meta-device init: build under ``torch.device("meta")``, ``to_empty(device=...)``, then
    `reset_parameters` (as Lightning and FSDP2 do) gives the same module as an eager build.
    Checkpoints of fixed frequencies built from settings record them (``get_extra_state``): loading
    one trained with other settings (``theta``, ``axis_dims``) raises an error naming them.
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
        # on the CPU whatever the default device: meta-device init keeps real values to reset from
        freqs = rope_f.axial_frequencies(dim, n_axes, theta=theta, axis_dims=axis_dims, device="cpu")
        device = torch.get_default_device() if device is None else device
        self._setup(
            freqs, learnable=False, layout=layout, reference_shape=reference_shape, device=device, persistent=False,
            recorded=True,
        )

    @classmethod
    def from_frequencies(
        cls,
        freqs: Tensor,
        *,
        learnable: bool = False,
        layout: rope_f.Layout = "half",
        reference_shape: Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ) -> RotaryEmbedding:
        """RoPE with any frequency matrix F (A, P) or (H, A, P), on ``device`` (default: F's).

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
        device = freqs.device if device is None else device
        module._setup(freqs, learnable=learnable, layout=layout, reference_shape=reference_shape, device=device)
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
        the same with and without this module: a model patched by `ndrope.integrations` saves as the original);
        ``learnable=True`` makes F a float32 parameter initialised from the recipe (saved). With a coordinate law other than integer indices, ``mode="interpolate"`` applies
        only to index laws without a reference shape of their own (see `positions`).
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
            layout=recipe.layout,
            reference_shape=reference_shape,
            device=recipe.freqs.device,
            persistent=False,  # a patched model saves exactly as the original
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
        freqs = rope_f.mixed_frequencies(dim, n_axes, num_heads, theta=theta, axis_dims=axis_dims, generator=generator)
        device = torch.get_default_device() if device is None else device  # meta under torch.device("meta")
        return cls.from_frequencies(
            freqs, learnable=learnable, layout=layout, reference_shape=reference_shape, device=device
        )

    def _setup(
        self,
        freqs: Tensor,
        *,
        learnable: bool,
        layout: str,
        reference_shape: Sequence[int] | None,
        device: torch.device | str | None,
        persistent: bool = True,
        recorded: bool = False,
        attention_scale: float = 1.0,
        coordinates: CoordinateLaw | None = None,
    ) -> None:
        """Learned frequencies are a parameter; fixed ones a buffer, saved when ``persistent`` (given F that
        may not be recomputable), or recomputed, when ``recorded`` with a record in the state dict
        (`get_extra_state`) that is checked on load."""
        self.layout = check_choice("layout", layout, rope_f.Layout)
        if not isinstance(learnable, bool):
            raise TypeError(f"learnable={learnable!r} must be a bool")
        #: factor on cos and sin (a recipe's attention scale: YaRN, LongRoPE); 1.0 otherwise
        self.attention_scale = check_number("attention_scale", attention_scale)
        #: how a grid shape is positioned (a recipe's `Coordinates`); None: integer indices (`ndrope.grid`)
        self.coordinates = coordinates
        self.n_axes = freqs.shape[-2]
        self.reference_shape = None if reference_shape is None else self._check_grid("reference_shape", reference_shape)
        self._recorded = recorded and not learnable
        exact = freqs.detach().to(torch.promote_types(freqs.dtype, torch.float32))
        # what reset_parameters restores, and the exact fixed values when a cast rounds the buffer
        self._built_freqs = exact if exact.device.type == "meta" else exact.to("cpu", copy=True)
        on_device = exact.to(device, copy=True)
        if learnable:
            self.freqs = nn.Parameter(on_device)
        else:
            self.register_buffer("freqs", on_device, persistent=persistent)
        # the training grid's table, for fixed frequencies: rebuilt, never saved (timm's pattern)
        self.register_buffer("reference_cos", None, persistent=False)
        self.register_buffer("reference_sin", None, persistent=False)
        if self.reference_shape is not None and not learnable:
            self.reference_cos, self.reference_sin = self._reference_table()
        self.register_state_dict_post_hook(_keep_only_a_real_record)
        self.register_load_state_dict_pre_hook(_before_load)
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

    def reset_parameters(self) -> None:
        """Restore the frequencies the module was built with (loaded, for given fixed ones) and rebuild the
        reference table: after meta-device init and ``to_empty``, nothing is left uninitialised."""
        if self._built_freqs.device.type == "meta":
            raise RuntimeError(
                "this RotaryEmbedding was built from frequencies on the meta device, so there are no values to "
                "reset to: build the frequencies on a real device (they are small), e.g. with device='cpu'"
            )
        with torch.inference_mode(False), torch.no_grad():  # in this order: inference_mode(False) enables grad
            source = self._built_freqs.to(device=self.freqs.device, dtype=self.freqs.dtype)
            if type(self.freqs.data) is Tensor:
                self.freqs.copy_(source)
            else:  # a DTensor parameter (FSDP2): the plain source is the same on every rank
                from torch.distributed.tensor.experimental import implicit_replication

                with implicit_replication():
                    self.freqs.copy_(source)
        self._refresh_reference_table()

    def _exact_freqs(self) -> Tensor:
        """The frequencies in use, on the module's device: learned ones as they are; fixed ones at the
        precision they were built (or loaded) with, also after a cast rounded the buffer."""
        if self.learnable or self.freqs.dtype == self._built_freqs.dtype:
            return self.freqs
        return self._built_freqs.to(self.freqs.device)

    def _table_dtype(self, activations: torch.dtype | None = None) -> torch.dtype:
        """float32, or float64 for float64 ``activations`` (without them: for float64 learned frequencies)."""
        if activations is None:
            activations = self.freqs.dtype if self.learnable else torch.float32
        return torch.float64 if activations == torch.float64 else torch.float32

    def _reference_table_usable(self, dtype: torch.dtype) -> bool:
        """The stored float32 table serves float32 requests unless a cast changed its dtype, or it was built
        under inference_mode and autograd may need it now (not checked while compiling: Dynamo cannot ask)."""
        table = self.reference_cos
        if table is None or table.dtype != torch.float32 or dtype != torch.float32:
            return False
        return torch.compiler.is_compiling() or not table.is_inference() or torch.is_inference_mode_enabled()

    def _refresh_reference_table(self) -> None:
        if self.reference_cos is not None:
            self.reference_cos, self.reference_sin = self._reference_table()

    def get_extra_state(self) -> Tensor:
        """The record a checkpoint keeps of fixed frequencies built from settings (they are not saved as a
        buffer): F itself (A, P), float64, so that `set_extra_state` can check a checkpoint against this
        module. Empty for given or learned frequencies (the state dict holds them)."""
        return self._built_freqs.clone() if self._recorded else torch.empty(0, dtype=torch.float64)

    def set_extra_state(self, state: Any) -> None:
        """Raise unless a checkpoint's fixed frequencies are this module's, to the precision they were saved in."""
        if not self._recorded or not isinstance(state, Tensor) or state.numel() == 0:
            return
        mine = self._built_freqs
        tolerance = 4 * torch.finfo(state.dtype).eps if state.is_floating_point() else 0.0
        if state.shape == mine.shape and torch.allclose(state.to(mine), mine, rtol=tolerance, atol=0.0):
            return
        theirs, ours = _axial_settings(state.to(torch.float64)), _axial_settings(mine)
        differences = [
            f"{name}: checkpoint {theirs.get(name)!r}, this module {ours.get(name)!r}"
            for name in ("n_axes", "dim", "axis_dims", "theta")
            if theirs.get(name) != ours.get(name)
        ] or [f"frequencies {tuple(state.shape)}, values differ"]
        raise ValueError(
            "the checkpoint was trained with other fixed RoPE frequencies than this RotaryEmbedding computes ("
            + "; ".join(differences)
            + "): build the model with the checkpoint's settings (e.g. rope_theta) to load it"
        )

    def _check_grid(self, name: str, shape: Sequence[int]) -> tuple[int, ...]:
        shape = check_shape(name, shape)
        if len(shape) != self.n_axes:
            raise ValueError(f"{name}={shape} must have n_axes={self.n_axes} sizes")
        return shape

    def _reference_table(self) -> tuple[Tensor, Tensor]:
        # never an inference tensor, whatever mode the module is built or moved in: it serves autograd
        with torch.inference_mode(False), torch.no_grad():
            positions = self._grid_positions(self.reference_shape, "extrapolate", torch.float64)
            return self._scaled(rope_f.cos_sin(rope_f._phase(positions, self._exact_freqs(), torch.float32)))

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
            return self._exact_freqs()
        if self.reference_shape is None:
            raise ValueError("mode='ntk' needs reference_shape (the training grid)")
        scale = [size / ref for size, ref in zip(self._check_grid("grid_shape", grid_shape), self.reference_shape)]
        return rope_f.ntk_scaled_frequencies(self._exact_freqs(), scale)

    def rotation(
        self,
        positions: Positions,
        *,
        mode: ResolutionMode = "extrapolate",
        num_prefix_tokens: int = 0,
        dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(cos, sin), each (..., k + N, P), or (..., H, k + N, P) for per-head frequencies.

        ``positions`` is a grid shape (positioned by ``mode``) or explicit (..., N, A) coordinates
        (used as given). The first ``k = num_prefix_tokens`` rows are the identity (cos 1, sin 0): class
        and register tokens stay unrotated. ``dtype``: of the activations the tables will rotate; the
        tables are float32, or float64 for float64 activations (default: float64 only for float64
        positions or a module cast with ``.double()``). Compute once per forward and pass to every layer.
        """
        check_int("num_prefix_tokens", num_prefix_tokens, minimum=0)
        check_choice("mode", mode, ResolutionMode)
        table_dtype = self._table_dtype(dtype)
        if isinstance(positions, Tensor):
            check_tensor("positions", positions, min_rank=2)
            if positions.shape[-1] != self.n_axes:
                raise ValueError(f"positions shape {tuple(positions.shape)} must end with n_axes={self.n_axes} coordinates")
            if dtype is None and positions.dtype == torch.float64:
                table_dtype = torch.float64
            phase = rope_f.angles(positions.to(self.freqs.device), self._exact_freqs(), dtype=table_dtype)
            cos, sin = self._scaled(rope_f.cos_sin(phase))
        else:
            grid_shape = self._check_grid("grid_shape", positions)
            if grid_shape == self.reference_shape and self._reference_table_usable(table_dtype):
                cos, sin = self.reference_cos, self.reference_sin
            else:
                freqs = self.frequencies(grid_shape, mode=mode)
                # grid positions are finite by construction: no NaN check (a device sync on GPU)
                phase = rope_f._phase(self._grid_positions(grid_shape, mode, torch.float64), freqs, table_dtype)
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
        rotation = self.rotation(positions, mode=mode, num_prefix_tokens=num_prefix_tokens, dtype=q.dtype)
        return rope_f.apply_rotary_pair(q, k, rotation, layout=self.layout)  # one call (one launch on CUDA)


def _is_index_grid(law: Any) -> bool:
    """Whether a coordinate law is `ndrope.grid`'s: integer (i, j, ...) indices, no offset or rescale."""
    defaults = {"kind": "index", "reference_shape": None, "offset": 0.0, "indexing": "ij"}
    return all(getattr(law, name, object()) == value for name, value in defaults.items())


def _axial_settings(freqs: Tensor) -> dict[str, Any]:
    """dim, n_axes, axis_dims and theta of an axial F (A, P) (its ladder ``theta ** (-k / m)`` per axis), as
    far as F shows them: for the error message of a checkpoint with other settings."""
    if freqs.dim() != 2:
        return {}
    pairs = (freqs != 0).sum(dim=1).tolist()
    settings: dict[str, Any] = {"n_axes": freqs.shape[0], "dim": 2 * freqs.shape[1], "axis_dims": pairs}
    first = freqs[-1][freqs[-1] != 0]
    if first.numel() >= 2 and first[1] > 0:
        settings["theta"] = round(float((first[0] / first[1]) ** first.numel()), 6)
    return settings


def _before_load(module: RotaryEmbedding, state_dict: dict, prefix: str, *args: Any) -> None:
    """Before load_state_dict: given fixed frequencies are taken at the checkpoint's precision (the buffer
    may have been rounded by a cast); a checkpoint without a record of the fixed frequencies (saved by an
    older ndrope, or by another library: a timm ViT) loads unchecked."""
    if not module.learnable and isinstance(state_dict.get(prefix + "freqs"), Tensor):
        module._built_freqs = state_dict[prefix + "freqs"].detach().to("cpu", torch.promote_types(
            state_dict[prefix + "freqs"].dtype, torch.float32), copy=True)
    if prefix + "_extra_state" not in state_dict:
        state_dict[prefix + "_extra_state"] = module.get_extra_state()  # nothing to check against


def _keep_only_a_real_record(module: RotaryEmbedding, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """Given and learned frequencies are in the state dict themselves: no empty record beside them (their
    keys stay those of earlier ndrope versions, and of timm's models for the timm integration)."""
    if not module._recorded:
        state_dict.pop(prefix + "_extra_state", None)


def _rebuild_reference_table(module: RotaryEmbedding, incompatible_keys: Any) -> None:
    """After load_state_dict: the reference table follows the loaded frequencies."""
    module._refresh_reference_table()
