"""The README's self-contained examples run as written (the blocks that start with their imports; the
others are fragments that continue them on a user's model)."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
STANDALONE = [b for b in BLOCKS if b.lstrip().startswith(("import ", "from "))]


def test_readme_has_standalone_examples():
    assert len(STANDALONE) >= 2  # the fused op and the one-screen tour


@pytest.mark.parametrize("index", range(len(STANDALONE)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything an example writes stays in the test's folder
    exec(compile(STANDALONE[index], f"README.md example {index}", "exec"), {"__name__": "__readme__"})
