"""1D language-model RoPE: the GPT-NeoX / Llama ladder and the context-scaling families of
transformers' ``modeling_rope_utils.ROPE_INIT_FUNCTIONS`` (linear, dynamic NTK, YaRN, Llama 3, LongRoPE,
and "proportional", i.e. p-RoPE), reproduced formula for formula in float64.

Every function takes the attention head size ``head_dim`` and ``partial_rotary_factor`` as transformers does:
``dim = int(head_dim * partial_rotary_factor)`` channels rotate, P = dim // 2 pairs, in the "half" layout.
The result's ``freqs`` is (1, P); positions are token indices (N, 1) (``recipe.positions(N)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._checks import check_int, check_number
from ._base import RopeRecipe, ladder


def _rotary_dim(head_dim: int, partial_rotary_factor: float) -> int:
    check_int("head_dim", head_dim, minimum=2)
    if not 0.0 < partial_rotary_factor <= 1.0:
        raise ValueError(f"partial_rotary_factor={partial_rotary_factor!r} must be in (0, 1]")
    dim = int(head_dim * partial_rotary_factor)
    if dim < 2:
        raise ValueError(f"head_dim={head_dim} * partial_rotary_factor={partial_rotary_factor} rotates no pair")
    return dim


def _ladder_for(dim: int, theta: float) -> torch.Tensor:
    """transformers' ``1 / theta ** (arange(0, dim, 2) / dim)`` for ``dim`` rotated channels (odd dim included)."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)


def _text(freqs: torch.Tensor, attention_scale: float = 1.0) -> RopeRecipe:
    return RopeRecipe(freqs=freqs[None, :], layout="half", attention_scale=float(attention_scale))


def standard(head_dim: int, *, theta: float = 10000.0, partial_rotary_factor: float = 1.0) -> RopeRecipe:
    """The RoPE of Su et al. (2021) as GPT-NeoX / Llama use it (transformers ``rope_type="default"``).

    ``F[0, j] = theta ** (-2j / dim)``, ``dim = int(head_dim * partial_rotary_factor)``.
    """
    theta = check_number("theta", theta)
    return _text(_ladder_for(_rotary_dim(head_dim, partial_rotary_factor), theta))


def linear(
    head_dim: int, *, factor: float, theta: float = 10000.0, partial_rotary_factor: float = 1.0
) -> RopeRecipe:
    """Position interpolation (kaiokendev; Chen et al. 2023, https://arxiv.org/abs/2306.15595): the ladder
    divided by ``factor`` (``rope_type="linear"``)."""
    factor = check_number("factor", factor)
    return _text(standard(head_dim, theta=theta, partial_rotary_factor=partial_rotary_factor).freqs[0] / factor)


def dynamic_ntk(
    head_dim: int,
    *,
    factor: float,
    max_position_embeddings: int,
    seq_len: int | None = None,
    theta: float = 10000.0,
    partial_rotary_factor: float = 1.0,
) -> RopeRecipe:
    """Dynamic NTK-aware scaling (bloc97, emozilla; ``rope_type="dynamic"``) for a sequence of ``seq_len`` tokens.

    ``theta' = theta * (factor * L / max_position_embeddings - (factor - 1)) ** (dim / (dim - 2))`` with
    ``L = max(seq_len, max_position_embeddings)``: no change up to the trained length. transformers recomputes
    this whenever the sequence grows past its cache; call the recipe again with the new ``seq_len``.
    """
    theta = check_number("theta", theta)
    factor = check_number("factor", factor)
    check_int("max_position_embeddings", max_position_embeddings)
    dim = _rotary_dim(head_dim, partial_rotary_factor)
    length = max_position_embeddings if seq_len is None else max(int(seq_len), max_position_embeddings)
    base = theta * ((factor * length / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    return _text(_ladder_for(dim, base))


def yarn(
    head_dim: int,
    *,
    factor: float | None,
    original_max_position_embeddings: int,
    max_position_embeddings: int | None = None,
    theta: float = 10000.0,
    attention_factor: float | None = None,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    mscale: float | None = None,
    mscale_all_dim: float | None = None,
    truncate: bool = True,
    partial_rotary_factor: float = 1.0,
) -> RopeRecipe:
    """YaRN (Peng et al. 2023, https://arxiv.org/abs/2309.00071), as transformers' ``rope_type="yarn"``.

    Pairs that turn more than ``beta_fast`` times over the original context keep their frequency, pairs that
    turn fewer than ``beta_slow`` times are divided by ``factor``, a linear ramp blends the ones between
    (``truncate`` rounds the ramp ends outward to whole pairs). ``attention_scale`` defaults to
    ``0.1 * log(factor) + 1``, or to ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` when both are
    given (DeepSeek). ``factor=None`` means ``max_position_embeddings / original_max_position_embeddings``.
    As in transformers, ``beta_fast`` / ``beta_slow`` of 0 fall back to 32 / 1.
    """
    theta = check_number("theta", theta)
    check_int("original_max_position_embeddings", original_max_position_embeddings)
    if factor is None:
        if max_position_embeddings is None:
            raise ValueError("yarn needs factor, or max_position_embeddings to derive it")
        factor = max_position_embeddings / original_max_position_embeddings
    factor = check_number("factor", factor)
    dim = _rotary_dim(head_dim, partial_rotary_factor)

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = beta_fast or 32.0
    beta_slow = beta_slow or 1.0

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original_max_position_embeddings / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = _ladder_for(dim, theta)
    freqs = extrapolation / factor * ramp + extrapolation * (1 - ramp)
    return _text(freqs, attention_factor)


def llama3(
    head_dim: int,
    *,
    factor: float = 8.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_position_embeddings: int = 8192,
    theta: float = 500000.0,
    partial_rotary_factor: float = 1.0,
) -> RopeRecipe:
    """Llama 3.1's scaling (``rope_type="llama3"``): wavelengths above ``L / low_freq_factor`` are divided by
    ``factor``, those below ``L / high_freq_factor`` kept, and a smooth blend between (L the original context)."""
    theta = check_number("theta", theta)
    factor = check_number("factor", factor)
    if not high_freq_factor > low_freq_factor:
        raise ValueError(f"high_freq_factor={high_freq_factor} must exceed low_freq_factor={low_freq_factor}")
    inv_freq = _ladder_for(_rotary_dim(head_dim, partial_rotary_factor), theta)
    context = original_max_position_embeddings
    low_wavelen, high_wavelen = context / low_freq_factor, context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return _text(torch.where(medium, smoothed, scaled))


def longrope(
    head_dim: int,
    *,
    short_factor: Sequence[float],
    long_factor: Sequence[float],
    original_max_position_embeddings: int,
    max_position_embeddings: int | None = None,
    factor: float | None = None,
    attention_factor: float | None = None,
    seq_len: int | None = None,
    theta: float = 10000.0,
    partial_rotary_factor: float = 1.0,
) -> RopeRecipe:
    """LongRoPE (Ding et al. 2024, https://arxiv.org/abs/2402.13753; Phi-3), as ``rope_type="longrope"``.

    Pair j's frequency is divided by ``long_factor[j]`` when ``seq_len > original_max_position_embeddings``,
    by ``short_factor[j]`` otherwise (transformers switches per forward on the largest position + 1).
    ``attention_scale`` defaults to ``sqrt(1 + log(factor) / log(original_max_position_embeddings))`` (1 if
    factor <= 1), with ``factor`` defaulting to ``max_position_embeddings / original_max_position_embeddings``.
    """
    theta = check_number("theta", theta)
    check_int("original_max_position_embeddings", original_max_position_embeddings)
    dim = _rotary_dim(head_dim, partial_rotary_factor)
    if factor is None:
        if max_position_embeddings is None:
            raise ValueError("longrope needs factor, or max_position_embeddings to derive it")
        factor = max_position_embeddings / original_max_position_embeddings
    if attention_factor is None:
        attention_factor = (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_max_position_embeddings))
        )
    use_long = bool(seq_len) and seq_len > original_max_position_embeddings
    chosen = torch.as_tensor(long_factor if use_long else short_factor, dtype=torch.float64)
    if chosen.shape != (dim // 2,):
        name = "long_factor" if use_long else "short_factor"
        raise ValueError(f"{name} must have dim // 2 = {dim // 2} entries, got shape {tuple(chosen.shape)}")
    return _text(_ladder_for(dim, theta) / chosen, attention_factor)


def p_rope(head_dim: int, fraction: float, *, theta: float = 10000.0, factor: float = 1.0) -> RopeRecipe:
    """p-RoPE (Barbero et al. 2024, "Round and Round We Go! What makes Rotary Positional Encodings useful?",
    https://arxiv.org/abs/2410.06205): keep the ``int(fraction * head_dim // 2)`` highest frequencies of the full
    ladder and set the rest to zero frequency (those channels carry no position), as transformers'
    ``rope_type="proportional"`` (Gemma) does; ``factor`` divides the kept frequencies.

    Unlike ``partial_rotary_factor`` the ladder keeps its full-width exponents ``2j / head_dim`` and all
    ``head_dim // 2`` pairs stay in F (the zero ones rotate by 0).
    """
    theta = check_number("theta", theta)
    factor = check_number("factor", factor)
    check_int("head_dim", head_dim, minimum=2)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r} must be in [0, 1]")
    kept = int(fraction * head_dim // 2)
    freqs = torch.zeros(head_dim // 2, dtype=torch.float64)
    freqs[:kept] = ladder(kept, theta, denominator=head_dim)
    return _text(freqs / factor)
