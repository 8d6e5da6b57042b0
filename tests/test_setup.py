"""The README's two commands set up what they need: the Makefile keeps a fresh machine on torch's CPU build."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _make_variable(text: str, name: str) -> str:
    return re.search(rf"^{name} \?= (\S+)$", text, re.M).group(1)


def test_bootstrap_installs_the_cpu_build_of_torch_before_the_project():
    makefile = (ROOT / "Makefile").read_text()
    lines = [line.strip() for line in makefile.splitlines()]
    torch_line = next(i for i, line in enumerate(lines) if "pip install" in line and "torch==" in line)
    project_line = next(i for i, line in enumerate(lines) if "pip install" in line and "-e " in line)
    assert torch_line < project_line, "torch must be installed before the project, or its range pulls a CUDA build"
    assert "--extra-index-url $(TORCH_INDEX)" in lines[torch_line]
    assert _make_variable(makefile, "TORCH_INDEX") == "https://download.pytorch.org/whl/cpu"
    # The CI workflow installs the same version from the same index.
    workflow = "\n".join(p.read_text() for p in (ROOT / ".github" / "workflows").glob("*.yml"))
    version = _make_variable(makefile, "TORCH_VERSION")
    assert f"torch=={version}" in workflow and "download.pytorch.org/whl/cpu" in workflow


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme.split("\n## ")[0] and "make test" in ci
