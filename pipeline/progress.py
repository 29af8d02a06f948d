"""Progress of a long loop: a tqdm bar on a terminal, a log line at a steady interval everywhere else.

DVC runs each stage with stderr on a pipe, not a terminal, so a tqdm bar would stay silent for the
minutes a stage takes (extract, train, evaluate, interpret and steer each run one to several minutes on
the CPU default). Off a terminal a :class:`Progress` therefore logs one line every
``SAE_PROGRESS_INTERVAL`` seconds (default 15) from a background thread, whether or not the loop has
advanced since (a single slow step still shows the stage is alive), and one line when it finishes::

    12:01:15 INFO sae.progress: extract train layers.9.resid_post: 245,760/943,744 tok (26%), 9.7k tok/s, ETA 1m12s
    12:03:40 INFO sae.progress: train layers.9.resid_post: 1,024/2,048 steps (50%), 15.1k tok/s, ETA 1m09s, loss=47.5

The rate and ETA are averages since the loop started (work already on disk from an earlier, resumed
run is not counted in the rate). Only the main process of a data-parallel run should pass ``enabled``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import weakref
from types import TracebackType
from typing import Any

log = logging.getLogger("sae.progress")

__all__ = ["Progress", "interval_s", "format_duration", "format_count"]

DEFAULT_INTERVAL_S = 15.0
INTERVAL_ENV = "SAE_PROGRESS_INTERVAL"


def interval_s() -> float:
    """Seconds between progress lines off a terminal: ``$SAE_PROGRESS_INTERVAL`` (default 15; invalid -> 15)."""
    try:
        value = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S))
    except ValueError:
        return DEFAULT_INTERVAL_S
    return value if value > 0 else DEFAULT_INTERVAL_S


def format_duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``3725`` -> ``1h02m``; ``9`` -> ``9s``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_count(x: float) -> str:
    """A rate with an SI suffix: ``15123.4`` -> ``15.1k``, ``2.5e6`` -> ``2.5M``, ``3.21`` -> ``3.21``."""
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g}{suffix}"
    return f"{x:.3g}"


class Progress:
    """``with Progress("extract train", total=n_tokens, unit="tok") as p: ... p.update(k)``.

    ``unit``: what ``total`` counts (``tok``, ``steps``, ``contexts``, ...); ``tokens_per_unit``: tokens in one
    unit, for the tok/s figure when the unit is not tokens (e.g. a training step's batch size); ``None`` shows
    the rate in units/s. ``initial``: units already done before this run (a resume). ``terminal``: force
    the mode (default: whether stderr is a terminal).
    """

    def __init__(self, desc: str, total: int | None, unit: str = "tok", *, initial: int = 0,
                 tokens_per_unit: float | None = None, enabled: bool = True, terminal: bool | None = None,
                 interval: float | None = None) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.tokens_per_unit = 1.0 if unit == "tok" and tokens_per_unit is None else tokens_per_unit
        self.n = self._initial = initial
        self.postfix: dict[str, Any] = {}
        self.enabled = enabled
        self.interval = interval if interval is not None else interval_s()
        self._t0 = time.perf_counter()
        self._bar: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not enabled:
            return
        if terminal if terminal is not None else sys.stderr.isatty():
            from tqdm import tqdm

            unit_scale = unit == "tok"
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale,
                             dynamic_ncols=True, smoothing=0.1)
        else:
            # A daemon thread holding only a weak reference: a stage that dies mid-loop is never kept alive
            # by its progress lines, and a loop that raised without closing them silences them once its
            # Progress is gone.
            self._thread = threading.Thread(target=_beat, args=(weakref.ref(self), self._stop, self.interval),
                                            name=f"progress {desc}", daemon=True)
            self._thread.start()

    # -- the loop's side ---------------------------------------------------------------------------
    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)

    def set_postfix(self, **values: Any) -> None:
        """Short ``key=value`` pairs appended to the line (e.g. the training loss)."""
        self.postfix = values
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            log.info("%s", self.line(final=True))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if typ is not None and self._thread is not None:  # a failing loop: no "done" line
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.close()

    # -- the lines ---------------------------------------------------------------------------------
    def line(self, final: bool = False) -> str:
        """``<desc>: <done>/<total> <unit> (<pct>%), <rate>, ETA <t>[, k=v ...]``; when ``final``, ``done in <t>``."""
        elapsed = time.perf_counter() - self._t0
        done = self.n - self._initial
        rate = done / elapsed if elapsed > 0 else 0.0  # units/s since this run started
        parts = [f"{self.n:,}/{self.total:,} {self.unit}" if self.total is not None else f"{self.n:,} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        if self.tokens_per_unit is not None:
            parts.append(f"{format_count(rate * self.tokens_per_unit)} tok/s")
        else:
            parts.append(f"{format_count(rate)} {self.unit}/s")
        if final:
            parts.append(f"done in {format_duration(elapsed)}")
        elif self.total is not None and rate > 0:
            parts.append(f"ETA {format_duration(max(self.total - self.n, 0) / rate)}")
        else:
            parts.append(f"{format_duration(elapsed)} elapsed")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        return f"{self.desc}: " + ", ".join(parts)


def _beat(ref: weakref.ref[Progress], stop: threading.Event, interval: float) -> None:
    """Log ``ref()``'s line every ``interval`` s until ``stop``, the Progress is collected or the main thread ends."""
    while not stop.wait(interval) and threading.main_thread().is_alive():
        progress = ref()
        if progress is None:
            return
        log.info("%s", progress.line())
        del progress  # no strong reference between beats
