"""The fuzz setup itself: the fixed seed and the recorded example database are in force."""

from __future__ import annotations

from pathlib import Path

from hypothesis import settings
from hypothesis.database import DirectoryBasedExampleDatabase


def test_profile_records_examples_in_the_repository() -> None:
    db = settings().database
    assert isinstance(db, DirectoryBasedExampleDatabase)
    assert Path(db.path).resolve() == (Path(__file__).parent / "hypothesis-examples").resolve()
    assert settings().deadline is None

