"""Progress lines of long stages: steps done, rate and ETA."""

from fedbicross_flwr.logging_utils import progress_text


def test_progress_text_hand_computed() -> None:
    # 40 of 200 steps in 10 s: 4 steps/s, 160 left -> 40 s
    assert progress_text(40, 200, 10.0) == "40/200 (20%), 10.0 s, 4.00/s, ETA 40 s"
    # 1 of 1000 in 2 s: 0.5/s, 999 left -> 1998 s, shown in minutes
    assert progress_text(1, 1000, 2.0).endswith("ETA 33.3 min")
    # nothing done yet: no rate to extrapolate from
    assert progress_text(0, 10, 0.0).endswith("ETA n/a")


def test_logging_to_writes_the_block_and_detaches_even_on_error(tmp_path) -> None:
    import logging

    import pytest

    from fedbicross_flwr.logging_utils import LOGGER, log
    from fedbicross_flwr.reports.results import logging_to

    before = list(LOGGER.handlers)
    path = tmp_path / "log.txt"
    with pytest.raises(RuntimeError), logging_to(path):
        log(logging.WARNING, "inside %d", 1)
        raise RuntimeError("stage failed")
    log(logging.WARNING, "outside")
    text = path.read_text()
    assert "inside 1" in text and "outside" not in text
    assert LOGGER.handlers == before
