"""Progress bars on a terminal only.

In a log file (stderr redirected, a job scheduler, CI) a tqdm bar writes hundreds of
carriage-return updates; there the stages' own log lines (one per epoch, ADMM iteration or
grid point) tell the progress instead.
"""

from __future__ import annotations

from typing import Any, Iterable

from tqdm.auto import tqdm


def progress_bar(iterable: Iterable | None = None, *, enabled: bool, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, shown only when ``enabled`` and standard error is a terminal."""
    return tqdm(iterable, disable=None if enabled else True, dynamic_ncols=True, **kwargs)
