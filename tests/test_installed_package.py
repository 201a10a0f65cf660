"""The installed distribution: rules/ and fixtures/ live inside `rewriter`, never top level.

Builds the wheel from this checkout and installs it (without dependencies) into a fresh
directory, then imports from there in a subprocess whose working directory is outside the
checkout, so neither an editable install nor the source tree can stand in for it.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel_file,) = out.glob("*.whl")
    return wheel_file


def test_wheel_has_no_top_level_rules_or_fixtures(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {
        name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")
    }
    assert top_level == {"rewriter"}
    assert "rewriter/rules/__init__.py" in names
    assert "rewriter/rules/kv_shared_attention.py" in names
    assert "rewriter/fixtures/gemma4_like.py" in names
    assert not any(name.endswith(".onnx") for name in names)  # fixtures' models stay in the repo


def test_installed_wheel_imports_rules_as_rewriter_rules(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    probe = (
        "import importlib.util, rewriter, rewriter.rules, rewriter.fixtures.gemma4_like;"
        "assert importlib.util.find_spec('rules') is None;"
        "print(rewriter.rules.__file__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == target / "rewriter" / "rules" / "__init__.py"
