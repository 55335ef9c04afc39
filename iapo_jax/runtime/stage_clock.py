"""Wall seconds per stage of a step, with JAX's asynchronous dispatch accounted for.

A jitted call returns before its result is computed, so a plain timer would bill a stage's compute
to whichever later stage first waits for it. `lap` waits for the stage's outputs first.
"""

from __future__ import annotations

import time

import jax


class StageClock:
    """``clock.lap("rollout", tokens)`` adds the seconds since the previous lap to "rollout"."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str, *outputs) -> None:
        jax.block_until_ready(outputs)
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now

    def metrics(self) -> dict[str, float]:
        """{"<stage>_seconds": s, ..., "step_seconds": total}."""
        out = {f"{k}_seconds": v for k, v in self.seconds.items()}
        out["step_seconds"] = sum(self.seconds.values())
        return out
