"""Shared test fixtures.

Real third-party data lives in ``../shared/data`` next to the repository (CI always has it; a
user's clone does not). Tests that need it use the ``shared_data`` fixture, which skips with a
clear reason when it is absent. ``POSTTRAIN_SHARED_DATA`` points elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("POSTTRAIN_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"shared evaluation data not found at {SHARED_DATA} "
            "(set POSTTRAIN_SHARED_DATA to the folder holding gsm8k/, math500/, ...)"
        )
    return SHARED_DATA
