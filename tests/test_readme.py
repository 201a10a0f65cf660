"""The README's Python snippets run as written and print what they claim.

Each ```python block of README.md is executed in a fresh namespace, from a scratch folder
that holds a link to fixtures/ (the snippets name `fixtures/p2_tiny.onnx` and write beside
it), so a snippet that stops working fails here instead of misleading a user.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_SNIPPET = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def _snippets() -> list[str]:
    return _SNIPPET.findall((ROOT / "README.md").read_text())


def test_the_readme_has_python_snippets() -> None:
    assert len(_snippets()) >= 3


@pytest.mark.parametrize("index", range(len(_snippets())))
def test_readme_snippet_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(_snippets()[index], f"README.md python snippet {index}", "exec"), {})
    # fixtures/p2_tiny.onnx has 3 KV-shared layers and every snippet prints how many it
    # rewrote (alone or in the summary), so a snippet that rewrites nothing fails here.
    output = printed.getvalue()
    assert re.search(r"\b3\b", output), output
