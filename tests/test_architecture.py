"""The import direction between the package's layers (pyproject.toml [tool.importlinter], docs/design.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    """``lint-imports`` (import-linter, a test dependency) on the package: every contract of pyproject.toml is
    kept, lazy imports inside functions included."""
    lint = Path(sys.executable).parent / "lint-imports"
    assert lint.exists(), "import-linter is missing: pip install '.[test]'"
    result = subprocess.run([str(lint), str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout
