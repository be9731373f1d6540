"""The README's examples run as written, and `ndrope` stays importable without the ViT/training stack."""

from __future__ import annotations

import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import tomllib
import torch

ROOT = Path(__file__).resolve().parent.parent


def readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_ndrope_imports_only_torch():
    code = (
        "import sys, ndrope\n"
        "modules = ('timm', 'lightning', 'torchvision', 'einops', 'transformers', 'vit', 'training')\n"
        "print(sorted(m for m in modules if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


HIDE_MODULE = """
import sys

class Hide:  # as if the module were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == sys.argv[1]:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Hide())
import vit
"""


@pytest.mark.parametrize("missing", ["timm", "einops"])
def test_vit_without_its_extra_says_what_to_install(missing: str) -> None:
    out = subprocess.run([sys.executable, "-c", HIDE_MODULE, missing], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1] == (
        f"ModuleNotFoundError: vit needs {missing}, which is not installed: pip install \"ndrope-vit[vit]\" (in a "
        f"checkout: pip install -e \".[vit]\"); ndrope itself needs only torch"), out.stderr


def test_library_install_declares_torch_alone_and_installs_only_project_names():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert [re.split(r"[<>=!~ ]", d)[0] for d in project["project"]["dependencies"]] == ["torch"]
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["ndrope*", "vit*"]
    assert "py-modules" not in project["tool"].get("setuptools", {})
    assert "csrc/*.cpp" in project["tool"]["setuptools"]["package-data"]["ndrope"]


@pytest.mark.slow
def test_fresh_venv_with_only_pip_install_runs_the_readme_ndrope_example(tmp_path):
    """`pip install .` in a new virtual environment: ndrope works, the ViT/training stack is absent."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", str(ROOT)], check=True, cwd=tmp_path)
    block = next(b for b in readme_python_blocks() if "class Attention" in b)
    code = block + (
        "\nimport importlib.util\n"
        "assert Attention()(torch.randn(2, 1 + 14 * 14, 384), (14, 14)).shape == (2, 197, 384)\n"
        "absent = [m for m in ('timm', 'lightning', 'torchvision', 'einops') if importlib.util.find_spec(m)]\n"
        "print('absent-check', absent)\n"
    )
    out = subprocess.run([python, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "absent-check []" in out.stdout, out.stdout + out.stderr


def test_readme_attention_example_runs_at_two_grids():
    block = next(b for b in readme_python_blocks() if "class Attention" in b)
    namespace: dict = {}
    exec(block, namespace)
    layer = namespace["Attention"]()
    assert layer(torch.randn(2, 1 + 14 * 14, 384), (14, 14)).shape == (2, 197, 384)
    assert layer(torch.randn(1, 1 + 7 * 9, 384), (7, 9)).shape == (1, 64, 384)


def test_readme_vit_example_runs():
    block = next(b for b in readme_python_blocks() if "vit.NDRopeVisionTransformer(" in b)
    namespace: dict = {}
    exec(block, namespace)
    assert namespace["model"](torch.randn(1, 3, 24, 24)).shape == (1, 10)
    assert namespace["model"].rope_resolution_mode == "interpolate"


def test_readme_multimodal_example_is_the_real_output():
    text = (ROOT / "README.md").read_text()
    match = re.search(r">>> (ndrope\.multimodal_positions\(.*?\)\.long\(\)\.tolist\(\)).*?\n(.*?)```", text, flags=re.DOTALL)
    assert match, "README lost its multimodal example"
    import ndrope  # noqa: F401  (used by eval)

    shown = re.sub(r"#[^\n]*", "", match.group(2))
    assert eval(match.group(1)) == eval(shown)


def test_license_file_matches_the_metadata():
    metadata = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]
    assert "Apache-2.0" in str(metadata)
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_links_to_its_own_sections_resolve():
    """The table of contents and every other `](#...)` link name a heading that exists."""
    text = (ROOT / "README.md").read_text()
    outside_code = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", outside_code, flags=re.MULTILINE)}
    links = re.findall(r"\]\(#([^)]+)\)", outside_code)
    assert len(links) >= 10, links  # the table of contents at least
    assert sorted(set(links) - anchors) == []


def test_readme_test_command_is_what_ci_runs():
    """The quick start's test command is the last line of `.ci/run`, the command CI runs."""
    text = (ROOT / "README.md").read_text()
    quick_start = text[text.index("## Quick start"):text.index("### Installing")]
    commands = re.findall(r"```bash\n(.*?)\n```", quick_start, flags=re.DOTALL)
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci.replace("python -m pip", "pip") == commands[-1]
    assert commands[0].endswith("python -m training.study --config configs/study_fashion_mnist.yaml")
