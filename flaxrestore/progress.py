"""The progress bar of long work (the restore CLI's images, the trainer's steps): one tqdm style.

Bars go to stderr, so a command's real output (stdout) stays clean for pipes; messages printed
while a bar is shown go through :func:`write`, which keeps the bar on its own line.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def bar(total: int, *, desc: str, unit: str, initial: int = 0, enabled: bool = True) -> tqdm:
    """A progress bar over ``total`` units, starting at ``initial`` (a resumed run).

    ``enabled=False`` gives a bar that draws nothing (the hosts other than process 0).
    """
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled,
                file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


def write(msg: str, *, file=None) -> None:
    """Prints ``msg`` (to stdout by default) without breaking a progress bar being drawn."""
    tqdm.write(msg, file=file or sys.stdout)
