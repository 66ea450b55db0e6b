"""The progress bar of long work (the restore CLI's images, the trainer's steps): one tqdm style.

Bars go to stderr, so a command's real output (stdout) stays clean for pipes; messages printed
while a bar is shown go through :func:`write`, which keeps the bar on its own line.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def bar(total: int, *, desc: str, unit: str, initial: int = 0, enabled: bool = True) -> tqdm:
    """A progress bar over ``total`` units, starting at ``initial`` (a resumed run).

    ``enabled=False`` gives a bar that draws nothing (the hosts other than process 0). Written to
    a file or a pipe (a job's log), the bar is redrawn at most every 30 s instead of 10 times a
    second, so a long run's log holds a few lines per minute, not thousands.
    """
    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled,
                file=sys.stderr if tty else _Lines(sys.stderr), dynamic_ncols=True,
                smoothing=0.1, mininterval=0.1 if tty else 30.0)


class _Lines:
    """The stream of a bar drawn into a file or a pipe: each redraw becomes a line of its own.

    tqdm redraws in place with carriage returns, for terminals; in a job's log that leaves every
    redraw, and the messages printed between them, on one line. (tqdm has no such mode.)"""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        for part in text.split("\r"):
            part = part.rstrip()
            if part:
                self.stream.write(part + "\n")

    def flush(self) -> None:
        self.stream.flush()


def write(msg: str, *, file=None) -> None:
    """Prints ``msg`` (to stdout by default) without breaking a progress bar being drawn."""
    tqdm.write(msg, file=file or sys.stdout)
