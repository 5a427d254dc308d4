"""Shared test fixtures.

Tests that read the real data in ``../shared/data`` call :func:`shared_path`. In a user's clone without that folder
they skip with the reason; CI sets ``EXPRESS_REQUIRE_SHARED_DATA=1`` so a missing file fails instead.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EXPRESS_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def shared_path(name: str) -> Path:
    """Path of a file or folder in ``../shared/data``; skip (or fail in CI) when it is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        message = f"needs {path} (the shared real-data folder beside the repository), which is absent"
        if os.environ.get("EXPRESS_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(message + "; EXPRESS_REQUIRE_SHARED_DATA=1 makes this a failure")
        pytest.skip(message)
    return path


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine run many times faster on one torch thread (no OpenMP contention); a
    module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared():
    """The :func:`shared_path` helper as a fixture: ``shared("kang2018_pbmc_12261.h5ad")``."""
    return shared_path


def load_script(name: str):
    """A script of ``scripts/`` as a module (the scripts are not a package; the project itself is installed)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
