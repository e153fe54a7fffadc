"""Whether a decision line would be read: built only when a handler keeps it."""

from __future__ import annotations

import logging

import pytest
from mitmproxy import log

from hoop_addon.stages.telemetry import would_log


class Kept(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        pass


@pytest.fixture
def logger() -> logging.Logger:
    """A logger and its parent outside the logging registry (pytest adds capture
    handlers to registered ones), the parent at DEBUG as mitmproxy sets the root."""
    parent = logging.Logger("parent", logging.DEBUG)
    child = logging.Logger("parent.decision")
    child.parent = parent
    return child


def test_a_handler_that_keeps_info_reads_it(logger: logging.Logger) -> None:
    logger.parent.addHandler(Kept(logging.ERROR))  # type: ignore[union-attr]
    logger.parent.addHandler(Kept(logging.INFO))  # type: ignore[union-attr]

    assert would_log(logger)


def test_only_stricter_handlers_do_not_read_it(logger: logging.Logger) -> None:
    logger.parent.addHandler(Kept(logging.WARNING))  # type: ignore[union-attr]

    assert not would_log(logger)


def test_mitmproxys_add_log_handler_does_not_count(logger: logging.Logger) -> None:
    # it drops decision lines; at level NOTSET it would otherwise make every line "read"
    logger.parent.addHandler(log.LegacyLogEvents(master=None))  # type: ignore[union-attr, arg-type]

    assert not would_log(logger)


def test_a_logger_level_above_info_silences_it(logger: logging.Logger) -> None:
    logger.addHandler(Kept(logging.DEBUG))
    logger.setLevel(logging.WARNING)

    assert not would_log(logger)


def test_handlers_past_a_non_propagating_logger_are_not_reached(logger: logging.Logger) -> None:
    logger.parent.addHandler(Kept(logging.INFO))  # type: ignore[union-attr]
    logger.propagate = False

    assert not would_log(logger)
