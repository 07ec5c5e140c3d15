"""The progress bar (tqdm, on stderr) whose last line is printed once.

tqdm prints a line when an update reaches the total and again when the bar closes; on a terminal the
second overwrites the first, but in a log (CI, ``2> file``) the final line appeared twice.
"""

from __future__ import annotations

from tqdm import tqdm


class Progress(tqdm):  # type: ignore[misc]  # tqdm ships no types
    """``tqdm`` whose update reaching the total leaves the last line to ``close`` (printed once)."""

    def update(self, n: float | None = 1) -> bool | None:
        step = 1 if n is None else n
        if not self.disable and self.total is not None and self.n + step >= self.total:
            self.n += step
            return None
        done: bool | None = super().update(n)
        return done
