"""Logging set-up shared by the `mmcn` CLI and the DVC stage scripts, and the one progress
report of long loops (:class:`Progress`): a bar on a terminal, log lines in a log file."""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

# seconds between two progress lines when stderr is not a terminal (MMCN_PROGRESS_INTERVAL overrides)
PROGRESS_INTERVAL = 30.0


def setup_logging(verbose: bool = False) -> None:
    """INFO (DEBUG with ``verbose``) to stderr, with time, level and logger name on every line."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: short enough for a progress line."""
    s = int(round(max(seconds, 0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Counts, rate and ETA of a long loop, whether or not anyone watches a terminal.

    On a terminal (stderr a TTY): a tqdm bar. Otherwise (``dvc repro > log``, a Ray worker,
    CI): a log line every ``interval`` seconds (default :data:`PROGRESS_INTERVAL`, or the
    ``MMCN_PROGRESS_INTERVAL`` environment variable) and at every tenth of ``total``, e.g.
    ``train detector: 120/800 step (15%) in 4m10s, 2.08 s/step, ETA 23m36s, loss=1.234``.
    :meth:`close` (or leaving the ``with`` block) logs the final count and time in both modes.
    ``tenths=False`` keeps the interval lines only, ``final=False`` drops the closing line (for
    a part of a larger job whose own progress is logged elsewhere, e.g. one shard of many).
    The rate counts from creation, or with ``warmup=True`` from the first :meth:`update`
    (whose units it leaves out): model loading or actor start-up before the first result then
    does not skew the rate and ETA. The time shown counts from creation. Threads may share one.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", logger: logging.Logger | None = None,
                 interval: float | None = None, tty: bool | None = None, tenths: bool = True, final: bool = True,
                 warmup: bool = False):
        self.total, self.desc, self.unit, self.tenths, self.final = total, desc, unit, tenths, final
        self.log = logger or logging.getLogger("mmcn.progress")
        env = os.environ.get("MMCN_PROGRESS_INTERVAL")
        self.interval = interval if interval is not None else float(env) if env else PROGRESS_INTERVAL
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.done, self.postfix = 0, ""
        self._bar, self._lock = None, threading.Lock()
        self._created, self._warmup = time.perf_counter(), warmup
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, mininterval=1.0, leave=False)
        self.start()

    def start(self) -> None:
        """(Re)start the rate's clock from what is done now."""
        self._t0 = self._last = time.perf_counter()
        self._base = self.done
        self._tenth = self.done * 10 // self.total + 1 if self.total else 1

    def rate(self) -> float:
        """Units per second since :meth:`start`."""
        return (self.done - self._base) / max(time.perf_counter() - self._t0, 1e-9)

    def eta(self) -> float | None:
        """Seconds left at the current rate; None without a total or before anything was done."""
        rate = self.rate()
        return (self.total - self.done) / rate if self.total and rate > 0 else None

    def line(self) -> str:
        """``desc: done/total unit (pct%) in T, R unit/s, ETA T[, postfix]``."""
        elapsed, rate, eta = time.perf_counter() - self._created, self.rate(), self.eta()
        count = f"{self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%)" if self.total \
            else f"{self.done} {self.unit}"
        speed = f"{rate:.3g} {self.unit}/s" if rate >= 1 or rate == 0 else f"{1 / rate:.3g} s/{self.unit}"
        text = f"{self.desc}: {count} in {duration(elapsed)}, {speed}"
        if eta is not None and self.done < self.total:
            text += f", ETA {duration(eta)}"
        return text + (f", {self.postfix}" if self.postfix else "")

    def update(self, n: int = 1, **postfix) -> None:
        """``n`` more done; ``postfix`` (``loss=f"{loss:.3f}"``) is shown after the counts."""
        with self._lock:
            self._update(n, postfix)

    def _update(self, n: int, postfix: dict) -> None:
        self.done += n
        if self._warmup:
            self._warmup = False
            self.start()
        if postfix:
            self.postfix = ", ".join(f"{k}={v}" for k, v in postfix.items())
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix_str(self.postfix, refresh=False)
            return
        now = time.perf_counter()
        tenth = self.tenths and bool(self.total) and self.done * 10 >= self._tenth * self.total
        if tenth:
            self._tenth = self.done * 10 // self.total + 1
        if (tenth or now - self._last >= self.interval) and (not self.total or self.done < self.total):
            self._last = now
            self.log.info("%s", self.line())

    def iterate(self, items: Iterable[T]) -> Iterator[T]:
        """``items``, each counted as it is taken; the final line once they are all taken."""
        with self:
            for item in items:
                yield item
                self.update()

    def close(self) -> None:
        """The final line (counts, time, rate), in both modes."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.final:
            self.log.info("%s", self.line())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# Ray's routine lines that say nothing about this run: the token-auth notice of every local
# start (token auth stays on, Ray's default) and Ray Data's "progress bars disabled" notice
# (mmcn logs its own progress: Progress above)
_RAY_ROUTINE = ("ray._private.authentication.authentication_token_setup", "ray.data._internal.progress")


def ray_init_options() -> dict:
    """Keyword arguments for ``ray.init`` that keep Ray's INFO lines ("Started a local Ray
    instance", Ray Data's execution plans and its per-operator progress dumps) and routine
    notices out of the log; warnings about the run, errors and what the workers print (their
    progress lines) still come through. Call :func:`quiet_ray_data` after ``ray.init``."""
    for name in _RAY_ROUTINE:
        logging.getLogger(name).setLevel(logging.ERROR)
    return {"logging_level": logging.WARNING}


def quiet_ray_data() -> None:
    """Ray Data's own progress ("MapBatches: 0/1" every few seconds) off: mmcn's stages log
    counts, rate and ETA themselves (:class:`Progress`)."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its INFO lines: execution plans, "finished in"
