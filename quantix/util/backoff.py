"""Retry delays: exponential from ``initial`` to ``maximum``, each shortened by a little jitter.

The one backoff of the daemon: the libvirt reconnect, the control-plane link and the guest-agent
channels (through :func:`retry_policy`, the shape Twisted's ``ClientService`` wants) all use it.
The jitter only ever shortens a delay, so at the cap a peer that stays down sees at most one
attempt per ``maximum * (1 - jitter)`` seconds, and clients that lost it at the same moment drift
apart instead of retrying in lockstep.
"""

from __future__ import annotations

import random
from collections.abc import Callable


def delay(
    attempt: int,
    *,
    initial: float,
    maximum: float,
    factor: float = 2.0,
    jitter: float = 0.1,
    rand: Callable[[], float] = random.random,
) -> float:
    """The delay before retry number ``attempt`` (0-based): ``initial * factor**attempt``, capped
    at ``maximum``, then shortened by up to ``jitter`` (a fraction of it)."""
    base = initial
    for _ in range(max(attempt, 0)):
        base *= factor
        if base >= maximum:
            break
    return min(base, maximum) * (1.0 - jitter * rand())


class Backoff:
    """Stateful form of :func:`delay`: each :meth:`next` grows the delay, :meth:`reset` starts over.

    Defaults: 1 s, 2 s, 4 s … capped at 60 s, each shortened by up to 10 %.
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
        self._attempt = 0

    def next(self) -> float:
        """The delay before the next attempt; each call without :meth:`reset` grows it."""
        d = delay(
            self._attempt,
            initial=self.initial,
            maximum=self.maximum,
            factor=self.factor,
            jitter=self.jitter,
            rand=self._rand,
        )
        self._attempt += 1
        return d

    def reset(self) -> None:
        """The peer answered: the next failure starts from ``initial`` again."""
        self._attempt = 0

    @property
    def attempts(self) -> int:
        """Delays handed out since the last :meth:`reset`."""
        return self._attempt


def retry_policy(
    initial: float,
    maximum: float,
    *,
    factor: float = 2.0,
    jitter: float = 0.1,
    rand: Callable[[], float] = random.random,
) -> Callable[[int], float]:
    """:func:`delay` as ``ClientService``'s ``retryPolicy`` (failed attempts so far → delay)."""

    def policy(attempt: int) -> float:
        # ClientService counts failed attempts from 1.
        return delay(attempt - 1, initial=initial, maximum=maximum, factor=factor, jitter=jitter, rand=rand)

    return policy
