"""The layers of the house hold: import-linter's contracts (.importlinter) pass on this tree, and they can fail."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"


def test_the_layer_contracts_hold():
    done = subprocess.run([LINT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "broken" in done.stdout and " 0 broken" in done.stdout


def test_a_core_module_importing_a_method_breaks_a_contract(tmp_path):
    # The same contracts on a copy of the core with one upward import added must fail: they are not vacuous.
    config = (ROOT / ".importlinter").read_text()
    copy = tmp_path / "tree"
    for package in ("bench", "methods", "leaderboard", "apbench"):
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    spec = copy / "bench" / "spec.py"
    spec.write_text(spec.read_text() + "\nimport methods.hydra  # noqa: E402,F401\n")
    (copy / ".importlinter").write_text(config)
    done = subprocess.run(
        [LINT], cwd=copy, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(copy), "PATH": ""}
    )
    assert done.returncode != 0 and "bench.spec -> methods.hydra" in done.stdout, done.stdout[-2000:]
