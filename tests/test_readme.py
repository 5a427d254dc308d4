"""The README's Python examples run as printed (in a temporary folder, on the built-in data).

Every ```python block of the README is a test case; a block whose first line is ``# not run: <reason>`` is only
checked for syntax (for examples that need a GPU or a file the reader brings)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def _python_blocks() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_has_the_examples_it_promises():
    blocks = "\n".join(_python_blocks())
    for call in ("tokenize_adata", "ExpressForMaskedModeling", "api.fit_cell_types"):
        assert call in blocks, f"the README lost its {call} example"


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_example_parses(index):
    ast.parse(_python_blocks()[index])


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_example_runs(index, tmp_path):
    code = _python_blocks()[index]
    if code.startswith("# not run:"):
        pytest.skip(code.splitlines()[0][2:])
    script = tmp_path / "example.py"
    script.write_text("import torch\ntorch.set_num_threads(1)\n" + code)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
