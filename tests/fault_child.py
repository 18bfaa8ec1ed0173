"""A `mugcp` command in a child process that can be made to die: the fault-injection suite's child.

The children are forked from a forkserver that has mugcp, torch and open_clip imported already, so
a kill-and-resume cycle costs the command's work, not the seconds of an interpreter start. A fault
is a SIGKILL the child sends itself at the N-th `os.fsync` (inside a file write: the temporary file
holds data, the rename has not happened) or the N-th `os.rename` (a finished temporary part or
checkpoint folder about to appear), or one the parent sends at a random moment.
"""

from __future__ import annotations

import os
import signal
import sys

PRELOAD = ["mugcp.cli", "mugcp.trainer.train", "mugcp.trainer.evaluation", "mugcp.pipeline.extract",
           "mugcp.pipeline.backends"]


def _die_at(name: str, n: int) -> None:
    original = getattr(os, name)
    count = [0]

    def counting(*args, **kwargs):
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(os, name, counting)


def run(argv: list[str], fault: tuple[str, int] | None, log_path: str) -> None:
    """`mugcp ARGV` with output to `log_path`, killed by itself at the N-th call of `fault[0]` if given."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    sys.argv = ["mugcp", *argv]  # as the console script would see it (locks record the command)
    sys.stdout = sys.stderr = open(log_path, "a")
    if fault is not None:
        _die_at(*fault)
    from mugcp.cli import main

    main(argv)
