"""SIGTERM (a preemption notice) handled once per process, so a run stops cleanly and says so.

Schedulers send SIGTERM, often a second one soon after (``timeout`` wrappers, grace periods), then
SIGKILL. The first notice sets a flag. A checkpointing loop registered with ``defer`` sees the flag
at its next step, saves and stops; with no such loop the notice raises ``Preempted`` at once, so
the job unwinds and its record says "preempted". Later notices, and any notice inside ``shield``
(a final save, the record being written), never interrupt: they only say the run is stopping.

Only a single process on its main thread takes over SIGTERM; with several processes JAX's
preemption sync point decides (see ``Checkpointer.preemption_requested``).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator


class Preempted(BaseException):
    """The first SIGTERM arrived while no checkpoint loop could stop at a step boundary.

    A BaseException, like KeyboardInterrupt, so ``except Exception`` in job code does not eat it.
    """


class _State:
    def __init__(self):
        self.requested = threading.Event()
        self.installs = 0
        self.deferrers = 0
        self.shields = 0
        self.previous = None


_state = _State()


def _can_install() -> bool:
    if threading.current_thread() is not threading.main_thread():
        return False
    import jax

    return jax.process_count() == 1


def _on_sigterm(signum, frame) -> None:
    if _state.requested.is_set() or _state.shields:
        _state.requested.set()
        print("SIGTERM: ignored, the run is already saving and stopping (SIGKILL ends it at once)",
              file=sys.stderr, flush=True)
        return
    _state.requested.set()
    if _state.deferrers:
        print("SIGTERM: a final checkpoint will be saved at the next step, then the run stops",
              file=sys.stderr, flush=True)
        return
    print("SIGTERM: stopping the run", file=sys.stderr, flush=True)
    raise Preempted("preempted by SIGTERM")


def install() -> bool:
    """Take over SIGTERM (nested calls count; ``uninstall`` gives it back). False where it cannot."""
    if not _can_install():
        return False
    if _state.installs == 0:
        _state.requested.clear()
        _state.previous = signal.signal(signal.SIGTERM, _on_sigterm)
    _state.installs += 1
    return True


def uninstall() -> None:
    """Undo one ``install``; the last one restores the previous handler and clears the flag."""
    if _state.installs == 0:
        return
    _state.installs -= 1
    if _state.installs == 0:
        try:
            signal.signal(signal.SIGTERM, _state.previous or signal.SIG_DFL)
        except ValueError:  # not on the main thread anymore
            pass
        _state.previous = None
        _state.requested.clear()


def requested() -> bool:
    """True once a SIGTERM arrived while installed."""
    return _state.requested.is_set()


def defer(on: bool = True) -> None:
    """A loop that stops at step boundaries registers (``on``) or leaves (``on=False``)."""
    _state.deferrers = max(0, _state.deferrers + (1 if on else -1))


@contextlib.contextmanager
def shield() -> Iterator[None]:
    """No SIGTERM raises inside the block (SIGINT is also held off on the main thread)."""
    _state.shields += 1
    previous_int = None
    if threading.current_thread() is threading.main_thread():
        def on_sigint(signum, frame):
            print("Ctrl-C: ignored while the run saves its record; press again after it exits",
                  file=sys.stderr, flush=True)

        previous_int = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        _state.shields -= 1
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)
