"""Bugs this exporter survives instead of dying of them.

An exception that is not the broker's or the host's failure to answer is a bug here: the
step that raised it (an event, a poll, a metrics area, a tick) is skipped, the bug is
counted in ``celery_exporter_internal_errors_total{source}`` and logged with its traceback
the first time it happens at its place, so that a bug on every event is one log entry,
not a flood.
"""
from __future__ import annotations

import logging
import traceback

MAX_PLACES = 100  # distinct places remembered as logged; past it, bugs are counted only


def place(exc: BaseException) -> str:
    """Where an exception was raised (its innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


class ContainedBugs:
    """The bugs one part of the exporter contained: ``owner`` is the ``source`` label."""

    def __init__(self, log: logging.Logger, owner: str):
        self.log = log
        self.owner = owner
        self.count = 0
        self._logged: set[tuple[str, str]] = set()

    def record(self, exc: BaseException, doing: str, consequence: str = "skipped") -> None:
        self.count += 1
        key = (type(exc).__name__, place(exc))
        if key not in self._logged and len(self._logged) < MAX_PLACES:
            self._logged.add(key)
            self.log.error("%s: internal error while %s, %s (a bug, please report it with this traceback; "
                           "counted in celery_exporter_internal_errors_total{source=%r}, logged once per place)",
                           self.owner, doing, consequence, self.owner, exc_info=exc)
