"""A named-state machine: an enum of states, an enum of inputs, and the table of legal moves.

The table is the documentation: every state a box can be in and every input it accepts in each
state are listed in one literal, and an input the table does not list is a bug that fails loudly
(:class:`IllegalTransition`) instead of silently corrupting flags. Actions stay in the owner's
methods; the machine only says where the owner is and where an input takes it. Pure and
single-threaded: the owner calls it from the reactor.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

S = TypeVar("S", bound=enum.Enum)
I = TypeVar("I", bound=enum.Enum)  # noqa: E741


class IllegalTransition(RuntimeError):
    """An input arrived in a state whose row of the table does not accept it."""


class StateMachine(Generic[S, I]):
    """Current state plus ``table[(state, input)] -> next state``."""

    def __init__(
        self,
        name: str,
        initial: S,
        table: Mapping[tuple[S, I], S],
        on_transition: Callable[[S, I, S], None] | None = None,
    ) -> None:
        self.name = name
        self._state = initial
        self._table = dict(table)
        self._on_transition = on_transition

    @property
    def state(self) -> S:
        return self._state

    def accepts(self, event: I) -> bool:
        """Whether ``event`` is legal in the current state."""
        return (self._state, event) in self._table

    def fire(self, event: I) -> S:
        """Move on ``event``; returns the state left. Raises :class:`IllegalTransition`."""
        before = self._state
        try:
            after = self._table[(before, event)]
        except KeyError:
            raise IllegalTransition(f"{self.name}: {event.name} is not accepted in {before.name}") from None
        self._state = after
        if self._on_transition is not None:
            self._on_transition(before, event, after)
        return before
