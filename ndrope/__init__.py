"""ndrope: rotary position encodings in any number of dimensions. Its only dependency is torch.

Pure functions do the mathematics (`ndrope.functional`, `ndrope.positions`); `RotaryEmbedding` holds
frequencies and answers "the rotation for these positions"; the rotation itself is one registered op,
``ndrope::rotate`` (a one-pass C++ kernel on CPU, a Triton kernel on CUDA).
"""

from ._ops import CompiledRotation, set_compiled_rotation
from .functional import (
    Layout,
    Rotation,
    angles,
    apply_rotary,
    apply_rotary_pair,
    axial_frequencies,
    cos_sin,
    mixed_frequencies,
    ntk_scaled_frequencies,
)
from .modules import RESOLUTION_MODES, Positions, ResolutionMode, RotaryEmbedding
from .positions import augment_positions, grid, multimodal_positions

__version__ = "0.2.0"

__all__ = [
    "RESOLUTION_MODES",
    "CompiledRotation",
    "Layout",
    "Positions",
    "ResolutionMode",
    "Rotation",
    "RotaryEmbedding",
    "angles",
    "apply_rotary",
    "apply_rotary_pair",
    "augment_positions",
    "axial_frequencies",
    "cos_sin",
    "grid",
    "mixed_frequencies",
    "multimodal_positions",
    "ntk_scaled_frequencies",
    "set_compiled_rotation",
]

from . import recipes  # noqa: E402, F401  (named RoPE schemes; imports only torch and the names above)
