"""The README's examples run as written, and `ndrope` stays importable without the ViT/training stack."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_ndrope_imports_only_torch_and_einops():
    code = (
        "import sys, ndrope\n"
        "heavy = sorted(m for m in ('timm', 'lightning', 'torchvision', 'vit', 'training') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_readme_attention_example_runs_at_two_grids():
    block = next(b for b in readme_python_blocks() if "class Attention" in b)
    namespace: dict = {}
    exec(block, namespace)
    layer = namespace["Attention"]()
    assert layer(torch.randn(2, 1 + 14 * 14, 384), (14, 14)).shape == (2, 197, 384)
    assert layer(torch.randn(1, 1 + 7 * 9, 384), (7, 9)).shape == (1, 64, 384)


def test_readme_vit_example_runs():
    block = next(b for b in readme_python_blocks() if "vit.create_vit" in b)
    namespace: dict = {}
    exec(block, namespace)
    assert namespace["model"](torch.randn(1, 3, 24, 24)).shape == (1, 10)
    assert namespace["model"].rope.resolution_mode == "interpolate"


def test_readme_multimodal_example_is_the_real_output():
    text = (ROOT / "README.md").read_text()
    match = re.search(r">>> (ndrope\.multimodal_positions\(.*?\)\.long\(\)\.tolist\(\)).*?\n(.*?)```", text, flags=re.DOTALL)
    assert match, "README lost its multimodal example"
    import ndrope  # noqa: F401  (used by eval)

    shown = re.sub(r"#[^\n]*", "", match.group(2))
    assert eval(match.group(1)) == eval(shown)
