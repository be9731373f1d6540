"""x-transformers takes the rotation as an argument: ndrope's angles (any recipe, any number of axes) go in as
``rotary_pos_emb=(freqs, scale)``; with the standard recipe this is exactly x-transformers' own RoPE."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from recipe_parity import max_abs

from ndrope import recipes

x_transformers = pytest.importorskip("x_transformers")
if int(version("x-transformers").split(".")[0]) < 2:  # 1.x rotated half-split pairs, 2.0 pairs (2j, 2j + 1)
    pytest.skip("x-transformers < 2.0", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent


def x_transformers_rotation(angles: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, float]:
    """x-transformers rotates pairs (2j, 2j + 1) by ``freqs`` (B, N, 2P): each angle repeated for its pair."""
    return angles.repeat_interleave(2, dim=-1)[None], scale


def test_the_standard_recipe_is_x_transformers_own_rope():
    torch.manual_seed(0)
    decoder = x_transformers.Decoder(dim=64, depth=2, heads=4, rotary_pos_emb=True, rotary_emb_dim=8).eval()
    x = torch.randn(2, 40, 64)
    rope = recipes.standard(8, theta=10000.0)
    with torch.no_grad():
        own = decoder(x)
        ours = decoder(x, rotary_pos_emb=x_transformers_rotation(rope.angles(rope.positions(40))))
        no_rope = decoder(x, rotary_pos_emb=x_transformers_rotation(torch.zeros(40, 4)))
    assert max_abs(ours, own) <= 1e-5
    assert max_abs(no_rope, own) > 1e3 * max_abs(ours, own)  # the argument is what rotates


def test_readme_x_transformers_example_runs():
    text = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL) if "x_transformers" in b)
    namespace: dict = {}
    exec(block, namespace)
    assert namespace["out"].shape == (2, 14 * 14, 256)
