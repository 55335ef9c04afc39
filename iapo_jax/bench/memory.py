"""Peak resident memory of this process while a block of code runs (sampled by a thread)."""

from __future__ import annotations

import os
import resource
import threading
import time

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """`with PeakMemory() as pm: ...` then `pm.peak_gb`: the highest RSS seen (every 20 ms).

    Where /proc is missing it falls back to the process-lifetime high-water mark (ru_maxrss).
    """

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()

    def _watch(self):
        while not self._stop.is_set():
            rss = current_rss_bytes()
            if rss is not None:
                self.peak = max(self.peak, rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.peak == 0:  # no /proc: ru_maxrss is in KiB on Linux
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @property
    def peak_gb(self) -> float:
        return self.peak / 1e9
