"""Session fixtures for the teacher tests (helpers live in teacher_fixtures.py)."""

from __future__ import annotations

import pytest
from teacher_fixtures import build_seqcls_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_seqcls_dir(tmp_path_factory.mktemp("tiny-bert"))
