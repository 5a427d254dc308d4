"""The README's Python examples run as printed (in a temporary folder, on the built-in data)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def _python_blocks() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_has_the_examples_it_promises():
    blocks = _python_blocks()
    assert len(blocks) == 3
    assert "tokenize_adata" in blocks[0] and "ExpressForMaskedModeling" in blocks[1]
    assert "api.fit_cell_types" in blocks[2]


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1, 2], ids=["tokenizer", "model", "finetune"])
def test_readme_python_example_runs(index, tmp_path):
    code = _python_blocks()[index]
    script = tmp_path / "example.py"
    script.write_text("import torch\ntorch.set_num_threads(1)\n" + code)
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
