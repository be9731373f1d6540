"""ndrope: rotary position encodings in any number of dimensions.

Functional core in `ndrope.functional` and `ndrope.positions`; `RotaryEmbedding` is the module.
Depends only on torch and einops.
"""

from .functional import (
    LAYOUTS,
    Layout,
    Rotation,
    angles,
    apply_rotary,
    axial_frequencies,
    cos_sin,
    ladder_fraction,
    mixed_frequencies,
    ntk_scaled_frequencies,
    rotate_reference,
    split_pairs,
)
from .modules import KINDS, RESOLUTION_MODES, Kind, Positions, ResolutionMode, RotaryEmbedding
from .positions import augment_positions, grid, multimodal_positions

__version__ = "0.1.0"

__all__ = [
    "LAYOUTS",
    "KINDS",
    "RESOLUTION_MODES",
    "Kind",
    "Layout",
    "Positions",
    "ResolutionMode",
    "Rotation",
    "RotaryEmbedding",
    "angles",
    "apply_rotary",
    "augment_positions",
    "axial_frequencies",
    "cos_sin",
    "grid",
    "ladder_fraction",
    "mixed_frequencies",
    "multimodal_positions",
    "ntk_scaled_frequencies",
    "rotate_reference",
    "split_pairs",
]

from . import recipes  # noqa: E402  (named RoPE schemes; imports only torch and the names above)
