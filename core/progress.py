"""One progress-bar style for every long loop (rich): count, items/s, elapsed and ETA."""

from __future__ import annotations

import os
import sys

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second over rich's sliding window."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:7.1f}/s" if task.speed else "      -/s")


def progress(*extra_columns, transient: bool = False) -> Progress:
    """A rich Progress on stderr; off when stderr is not a terminal, unless MUGCP_PROGRESS=1; off with MUGCP_PROGRESS=0."""
    setting = os.environ.get("MUGCP_PROGRESS")
    disable = setting == "0" or (not sys.stderr.isatty() and setting != "1")
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), *extra_columns,
                    transient=transient, disable=disable)
