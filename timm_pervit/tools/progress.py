"""Progress that fits where it goes: a tqdm bar on a terminal, plain periodic lines in a log file.

A tqdm bar redraws itself with carriage returns; written to a file (CI, ``nohup``, a cluster job's log) that is
thousands of frames on one line. ``Progress`` draws the bar only on a terminal (or in a notebook) and otherwise logs
one readable line every ``every`` steps (by default at each tenth of the total, and at least once a minute), so a log
file gets about ten progress lines per bar. The demo, the benchmark and the converter use it; their ``--progress``
option (``auto``, ``bar``, ``log``, ``off``; ``--no-progress`` is ``off``) picks the mode, ``auto`` by
``isatty()`` of the bar's stream.

No torch or tqdm import at module level: the command line's ``--help`` stays fast, and without tqdm installed the
bar falls back to the log lines.
"""
import argparse
import functools
import math
import sys
import time
from typing import Any, Callable, Dict, Optional, TextIO, Union

__all__ = ['MODES', 'Progress', 'add_progress_arguments', 'resolve_mode']

#: The values of ``--progress``.
MODES = ('auto', 'bar', 'log', 'off')


def _isatty(stream: Optional[TextIO]) -> bool:
    try:
        return stream is not None and bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, a closed stream, a detached one
        return False


def _in_notebook() -> bool:
    """A Jupyter kernel (no terminal, but tqdm.auto draws a widget there)."""
    ipython = sys.modules.get('IPython')
    try:
        shell = ipython.get_ipython() if ipython is not None else None
    except Exception:  # IPython half imported or replaced: treat as no notebook
        return False
    return shell is not None and 'IPKernelApp' in getattr(shell, 'config', {})


def resolve_mode(progress: Union[bool, str, None] = 'auto', stream: Optional[TextIO] = None) -> str:
    """The progress mode, 'bar', 'log' or 'off', for a ``progress`` argument.

    True, None and 'auto' choose 'bar' when ``stream`` (default: ``sys.stderr``, where the bar goes) is a terminal or
    the process is a notebook kernel, and 'log' otherwise; False is 'off'.

    Raises:
        ValueError: For a string other than one of ``MODES``.
    """
    if progress is False:
        return 'off'
    if progress is True or progress is None:
        progress = 'auto'
    if progress not in MODES:
        raise ValueError(f'progress must be one of {", ".join(MODES)} (or a bool), got {progress!r}')
    if progress != 'auto':
        return progress
    return 'bar' if _isatty(sys.stderr if stream is None else stream) or _in_notebook() else 'log'


def add_progress_arguments(
        parser: argparse.ArgumentParser, what: str = 'progress bar', help: Optional[str] = None) -> None:
    """Add ``--progress {auto,bar,log,off}`` and ``--no-progress`` (both set ``args.progress``) to ``parser``."""
    parser.add_argument(
        '--progress', choices=MODES, default='auto',
        help=help or f'auto: a {what} on a terminal, plain periodic lines otherwise (a log file, CI); bar; log; off '
                     '(default: %(default)s)')
    parser.add_argument('--no-progress', dest='progress', action='store_const', const='off',
                        default=argparse.SUPPRESS, help='same as --progress off')


def _seconds(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f'{s} s'
    m, s = divmod(s, 60)
    h, m = divmod(m, 60)
    return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'


class Progress:
    """A progress bar on a terminal, periodic plain lines elsewhere, or nothing.

    Args:
        total: Number of steps (None: unknown; the lines then have no percentage or time left).
        desc: What progresses, the start of every line ('train', 'infer 224px').
        progress: The mode (``resolve_mode``): True / 'auto', 'bar', 'log', False / 'off'.
        log: Where the plain lines (and ``write``) go; default: a flushed print to ``file``.
        unit: The step's name in the lines ('step' -> '12/90 steps').
        every: Log mode: a line every this many steps (default: a tenth of ``total``, rounded up).
        interval: Log mode: also a line when this many seconds passed since the last one (None: never).
        file: The bar's stream (default: ``sys.stderr``); ``auto`` draws the bar when it is a terminal.
        leave: Keep the finished bar on the screen.
        **bar_kwargs: More tqdm arguments (bar mode only), e.g. ``dynamic_ncols=True``.
    """

    def __init__(
            self,
            total: Optional[int],
            desc: str,
            progress: Union[bool, str, None] = 'auto',
            log: Optional[Callable[[str], Any]] = None,
            unit: str = 'step',
            every: Optional[int] = None,
            interval: Optional[float] = 60.,
            file: Optional[TextIO] = None,
            leave: bool = True,
            **bar_kwargs: Any,
    ):
        self.file = sys.stderr if file is None else file
        self.mode = resolve_mode(progress, self.file)
        self.total, self.desc, self.unit = total, desc, unit
        self.every = max(1, every if every is not None else math.ceil((total or 10) / 10))
        self.interval = interval
        self.log = log if log is not None else functools.partial(print, file=self.file, flush=True)
        self.n = 0
        self.postfix: Dict[str, Any] = {}
        self._start = self._last_time = time.perf_counter()
        self._last_n = 0
        self._next = self.every
        self._bar = None
        self._tqdm = None
        if self.mode == 'bar':
            try:
                from tqdm.auto import tqdm
            except ImportError:  # tqdm is optional: plain lines instead
                self.mode = 'log'
            else:
                self._tqdm = tqdm
                self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.file, leave=leave, **bar_kwargs)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """``n`` more steps done; ``postfix`` (e.g. ``loss='2.301'``) is shown after the count."""
        self.n += n
        if postfix:
            self.postfix = postfix
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix)
        elif self.mode == 'log':
            now = time.perf_counter()
            if self.n >= self._next or (self.interval is not None and now - self._last_time >= self.interval):
                self._emit(now)

    def line(self, now: Optional[float] = None) -> str:
        """The plain progress line of the current state."""
        elapsed = (time.perf_counter() if now is None else now) - self._start
        units = self.unit if self.n == 1 else self.unit + 's'
        text = f'{self.desc}: {self.n}/{self.total} {units}' if self.total else f'{self.desc}: {self.n} {units}'
        if self.total:
            text += f' ({100 * self.n / self.total:.0f}%)'
        text += f', {_seconds(elapsed)}'
        if elapsed > 0 and self.n > 0:
            rate = self.n / elapsed
            text += f', {rate:.3g} {self.unit}/s' if rate >= 1 else f', {1 / rate:.3g} s/{self.unit}'
            if self.total and self.n < self.total:
                text += f', ~{_seconds((self.total - self.n) / rate)} left'
        if self.postfix:
            text += '; ' + ', '.join(f'{k} {v}' for k, v in self.postfix.items())
        return text

    def _emit(self, now: float) -> None:
        self.log(self.line(now))
        self._last_n, self._last_time = self.n, now
        self._next = (self.n // self.every + 1) * self.every

    def write(self, text: str) -> None:
        """A line of output through ``log``: above the bar (which is redrawn after it), or between the lines."""
        if self._bar is not None:
            with self._tqdm.external_write_mode(file=self.file):
                self.log(text)
        else:
            self.log(text)

    def close(self) -> None:
        """Close the bar; in log mode, log the final count when the last line did not show it."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == 'log' and self.n != self._last_n:
            self._emit(time.perf_counter())

    def __enter__(self) -> 'Progress':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
