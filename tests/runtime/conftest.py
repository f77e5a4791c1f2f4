"""Fixtures the runtime tests share."""

import shutil

import pytest

from ..helpers import aligned_store


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """A store of 3 aligned users, made once per module: copied by each test that damages or erases it."""
    return aligned_store(tmp_path_factory.mktemp("aligned"))


@pytest.fixture
def aligned_copy(aligned, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copytree(aligned, tmp_path / "store")
    return tmp_path / "store"
