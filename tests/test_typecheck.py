"""mypy over quantix/ (configuration in pyproject.toml), so a type error fails the suite too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

ROOT = Path(__file__).resolve().parents[1]


class TypeCheckTests(unittest.TestCase):
    def test_mypy_finds_nothing(self) -> None:
        mypy = Path(sys.executable).parent / "mypy"
        if not mypy.exists():
            if os.environ.get("CI"):
                self.fail("mypy is missing: pip install '.[test]'")
            raise unittest.SkipTest("mypy is not installed (pip install '.[test]')")
        env = {**os.environ, "QUANTIX_VENV": str(Path(sys.executable).parents[1])}
        out = subprocess.run(
            [str(ROOT / "scripts" / "typecheck.sh")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
