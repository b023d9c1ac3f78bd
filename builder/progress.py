"""Progress of long work, for build steps (`build-engines`) and byte transfers (`repo push/pull`):
rich bars on a terminal, plain lines otherwise, so CI logs and `| tee` files hold readable lines
instead of carriage-return redraws. It stands outside the layers (like builder/paths.py) because
the build and the storage layer both report through it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Self

from rich import filesize
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

Echo = Callable[[str], None]
PLAIN_STEPS = 4          # plain-line mode: a transfer prints a line every 1/PLAIN_STEPS of its bytes


def _stderr_echo(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _console() -> Console:
    return Console(stderr=True)


def on_terminal() -> bool:
    """Whether bars can be drawn: stderr is a terminal (rich honours TTY_COMPATIBLE / TTY_INTERACTIVE)."""
    return _console().is_terminal


def _live_progress(*columns) -> Progress:
    # stdout is drawn above the bars only when it goes to the same terminal; redirected, it stays
    # in its file instead of being swallowed by the live display
    return Progress(*columns, console=_console(), redirect_stdout=sys.stdout.isatty(), transient=False)


class BuildSteps:
    """The steps of a build, one task each (`<name:precision>  <step>`): a spinner and the elapsed
    time on a terminal, `  step ...` / `  step done (N s)` lines through `echo` otherwise.

    Use as a context manager around the whole build; `step(label, group)` around each step.
    """

    def __init__(self, echo: Echo = print, live: bool | None = None):
        self.echo = echo
        self.live = on_terminal() if live is None else live
        self._progress: Progress | None = None

    def __enter__(self) -> Self:
        if self.live:
            self._progress = _live_progress(SpinnerColumn(finished_text="[green]done"),
                                            TextColumn("{task.description}"), TimeElapsedColumn())
            self._progress.start()
        return self

    def __exit__(self, *_) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    @contextmanager
    def step(self, label: str, group: str = "") -> Iterator[None]:
        t0 = time.monotonic()
        if self._progress is None:
            self.echo(f"  {label} ...")
            yield
            self.echo(f"  {label} done ({time.monotonic() - t0:.1f} s)")
            return
        task = self._progress.add_task(f"{group}  {label}" if group else label, total=None)
        try:
            yield
        except BaseException:
            self._progress.update(task, description=f"{group}  {label} [red]failed")
            self._progress.stop_task(task)
            raise
        self._progress.update(task, total=1, completed=1)


class Transfer:
    """One byte count moving towards a known total (a push or pull): a bar with speed and time left
    on a terminal, a line every quarter otherwise (`pull s3://b/p: 50% (6.3 MB of 12.6 MB)`). Safe to
    call from the transfer threads."""

    def __init__(self, total: int, desc: str, live: bool | None = None, echo: Echo = _stderr_echo):
        self.total, self.desc, self.echo = total, desc, echo
        self.done = 0
        self._lock = threading.Lock()
        self._next_line = 0            # plain mode: the next quarter to report
        self._progress: Progress | None = None
        if on_terminal() if live is None else live:
            self._progress = _live_progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                            TransferSpeedColumn(), TimeRemainingColumn())
            self._task = self._progress.add_task(desc, total=total)
            self._progress.start()
        else:
            self._report()

    def __call__(self, n: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)
            return
        with self._lock:
            self.done += n
            self._report()

    def _report(self) -> None:
        if self.total <= 0:
            return
        while self._next_line <= PLAIN_STEPS and self.done * PLAIN_STEPS >= self._next_line * self.total:
            part = filesize.decimal(self.total * self._next_line // PLAIN_STEPS)
            self.echo(f"{self.desc}: {100 * self._next_line // PLAIN_STEPS}% ({part} of "
                      f"{filesize.decimal(self.total)})")
            self._next_line += 1

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
