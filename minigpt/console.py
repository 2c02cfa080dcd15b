"""What a person sees on stderr: one-line messages and plain progress lines.

stdout is never used here: it carries results (sampled text, JSON, YAML). Console progress is a
redrawn tqdm bar when stderr is a terminal. When it is not (a log file, nohup, systemd, CI) it is
`PlainProgress`: a plain line about every 10% of the work or every 30 seconds, whichever comes
first, with no carriage returns, so the log reads top to bottom.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, TextIO

from tqdm import tqdm


def log(message: str) -> None:
    """Write one line of progress information to stderr (without breaking a progress bar)."""
    tqdm.write(message, file=sys.stderr)


def stderr_is_terminal() -> bool:
    """Whether stderr is an interactive terminal or a Jupyter notebook (where a redrawn progress bar belongs)."""
    if "ipykernel" in sys.modules:  # a notebook draws tqdm's bar (or widget) as one line that updates
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def duration(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class PlainProgress:
    """Progress as plain lines, about every 10% of `total` or every `every_s` seconds: no carriage returns.

    Each line reads `LABEL N/M (P%), <extra values>, elapsed H:MM:SS, ETA H:MM:SS`, the rate
    measured over this process's own progress. `clock` is injectable so tests need not wait.
    """

    def __init__(self, total: int, initial: int = 0, label: str = "step", amount: Callable[[int], str] = str,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic, every_s: float = 30.0):
        self.total, self.initial, self.label, self.amount = total, initial, label, amount
        self.stream = stream if stream is not None else sys.stderr
        self.clock, self.every_s = clock, every_s
        self.started = self.last_time = clock()
        self.last_n = initial
        self.extra: dict[str, str] = {}

    def _decile(self, n: int) -> int:
        return 10 * n // self.total if self.total > 0 else 0

    def update(self, n: int, extra: dict[str, str] | None = None) -> None:
        """Record progress `n` (and the latest extra values); write a line when one is due."""
        self.extra.update(extra or {})
        now = self.clock()
        finished = self.total > 0 and n >= self.total > self.last_n
        if finished or self._decile(n) > self._decile(self.last_n) or (n > self.last_n and now - self.last_time >= self.every_s):
            self.write(n, now)

    def write(self, n: int, now: float) -> None:
        """Write one progress line for `n` at time `now`."""
        elapsed = now - self.started
        rate = (n - self.initial) / elapsed if elapsed > 0 else 0.0
        eta = duration((self.total - n) / rate) if rate > 0 else "?"
        percent = f" ({100 * n // self.total}%)" if self.total > 0 else ""
        parts = [f"{self.label} {self.amount(n)}/{self.amount(self.total)}{percent}"]
        parts += [f"{key} {value}" for key, value in self.extra.items()]
        parts += [f"elapsed {duration(elapsed)}", f"ETA {eta}"]
        self.stream.write(", ".join(parts) + "\n")
        self.stream.flush()
        self.last_n, self.last_time = n, now


@contextmanager
def byte_progress(label: str, plain: bool | None = None, clock: Callable[[], float] = time.monotonic
                  ) -> Iterator[Callable[[int, int], None]]:
    """A `progress(done_bytes, total_bytes)` callback: a tqdm bar on a terminal, plain lines otherwise."""
    if plain is None:
        plain = not stderr_is_terminal()
    if plain:
        lines = PlainProgress(0, label=label, amount=lambda n: f"{n / 1e6:.1f} MB", clock=clock)

        def plain_update(done: int, total: int) -> None:
            lines.total = total
            lines.update(done)

        yield plain_update
        return
    with tqdm(total=0, unit="B", unit_scale=True, desc=label, file=sys.stderr, leave=False, delay=0.5) as bar:
        def bar_update(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield bar_update


def progress_bar_class() -> type[tqdm]:
    """tqdm's auto mode: a widget in a Jupyter notebook that has ipywidgets, else the text bar (which a
    notebook also draws as one clean line, since it honours carriage returns)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tqdm.auto warns when a notebook lacks ipywidgets; the text bar is fine
        from tqdm.auto import tqdm as auto_tqdm
    return auto_tqdm
