"""The tree is clean under ruff (lint and format, configured in pyproject.toml): the suite
fails on a line the linter or the formatter would change."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _ruff(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    ruff = Path(sys.executable).with_name("ruff")
    return subprocess.run([str(ruff), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_ruff_check_is_clean():
    done = _ruff("check", "--no-cache", ".")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_ruff_format_is_clean():
    done = _ruff("format", "--check", "--no-cache", ".")
    assert done.returncode == 0, "ruff format would change:\n" + done.stdout[-4000:] + done.stderr[-2000:]


def test_the_checks_fail_on_a_bad_file(tmp_path):
    """The same configuration catches a long line, an unused import and unformatted code."""
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    (tmp_path / "bad.py").write_text("import os\nx = {'a':1}\ny = '" + "z" * 130 + "'\n")
    check = _ruff("check", "--no-cache", "bad.py", cwd=tmp_path)
    assert check.returncode == 1 and "F401" in check.stdout and "E501" in check.stdout, check.stdout
    assert _ruff("format", "--check", "--no-cache", "bad.py", cwd=tmp_path).returncode == 1
