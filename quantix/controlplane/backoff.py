"""Retry delays: exponential from ``initial`` to ``maximum`` with a little downward jitter (pure)."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """1 s, 2 s, 4 s … capped at 60 s, each shortened by up to ``jitter`` (a fraction).

    The jitter only ever shortens a delay, so at the cap a control plane that stays down sees at
    most one request per ``maximum * (1 - jitter)`` seconds per node, and nodes that lost it at
    the same moment drift apart instead of retrying in lockstep.
    """

    def __init__(
        self,
        initial: float = 1.0,
        maximum: float = 60.0,
        factor: float = 2.0,
        jitter: float = 0.1,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self._rand = rand
        self._base = initial

    def next(self) -> float:
        """The delay before the next attempt; each call without :meth:`reset` grows it."""
        base = self._base
        self._base = min(self.maximum, self._base * self.factor)
        return base * (1.0 - self.jitter * self._rand())

    def reset(self) -> None:
        self._base = self.initial
